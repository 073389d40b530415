"""Request planning: what `generate` will run for a request, before any model runs.

One function for the pipeline, the job service and the UI, so the three agree on the same audio:
audio samples → model-track length (`track_samples`: one speaker's own; two speakers `para` → the longer, the
shorter padded; `add` → both, one after the other) → 25 fps frames (`frames_for_samples`, as the audio encoder
counts its rows) → chunks (capped by `max_seconds`) → model calls (chunks × real steps × passes per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError, OptionError
from .media.audio import SAMPLE_RATE
from .options import GenerateOptions, LoadOptions
from .presets.fast import plan_lines as fast_mode_lines
from .sampling.guidance import passes_for
from .sampling.schedules import SamplerPlan
from .sampling.schedules import describe as describe_sampler
from .sampling.step_cache import StepCachePlan
from .sampling.step_cache import describe as describe_step_cache
from .sampling.windows import FPS, ChunkPlan, plan_chunks


def track_samples(samples: Sequence[int], audio_mode: str = "para") -> int:
    """16 kHz samples of the model track every speaker gets (`generate` pads or concatenates the tracks to it)."""
    if len(samples) == 1:
        return samples[0]
    return sum(samples) if audio_mode == "add" else max(samples)


def frames_for_samples(samples: int) -> int:
    """25 fps frames of a 16 kHz track: the rows the audio encoder makes of it."""
    return int(samples / SAMPLE_RATE * FPS)


def max_frames(request: GenerateOptions) -> int | None:
    """The frame cap `max_seconds` sets (None: the whole audio)."""
    return None if request.max_seconds is None else max(1, int(round(request.max_seconds * FPS)))


@dataclass(frozen=True)
class RequestPlan:
    """The request's sampler, passes, step cache and fast-mode lines; its chunks when the audio length is known."""

    request: GenerateOptions
    sampler: SamplerPlan
    passes: list[str]
    step_cache: StepCachePlan | None
    mode_lines: list[str]
    chunks: ChunkPlan | None = None

    @property
    def model_calls(self) -> int | None:
        return None if self.chunks is None else self.chunks.num_chunks * self.sampler.steps * len(self.passes)

    def chunks_for(self, track_frames: Sequence[int]) -> ChunkPlan:
        """The chunk plan of the loop: one entry per speaker's track (`chunks` is made for speaker 1's)."""
        r = self.request
        return plan_chunks(list(track_frames), max_frames(r), r.frame_num, r.motion_frames)

    def as_dict(self) -> dict:
        """The plan as the sidecar, the job API, the CLI's dry run and the UI show it."""
        r = self.request
        out = {
            "scheduler": self.sampler.as_dict(),
            "steps": self.sampler.steps,
            "passes_per_step": len(self.passes),
            "passes": self.passes,
            "shift": r.effective_shift,
            "text_scale": r.text_scale,
            "audio_scale": r.audio_scale,
            "apg": r.use_apg,
            "color_correction": r.effective_color_correction,
            "size": r.size,
            "max_seconds": r.max_seconds,
            "step_cache": self.step_cache.as_dict() if self.step_cache else None,
            "mode_lines": self.mode_lines,
        }
        if self.chunks is not None:
            out["chunks"] = self.chunks.as_dict()
            out["model_calls"] = self.model_calls
        return out


def plan_request(request: GenerateOptions, audio_frames: int | None = None,
                 load: LoadOptions | None = None) -> RequestPlan:
    """What `generate` will run for `request` (validated here); `audio_frames`: the model track's 25 fps frames
    (`frames_for_samples(track_samples(...))`), when known; `load`: the loaded models' options (fast-mode lines)."""
    request.validate()
    sampler = describe_sampler(request.scheduler, request.steps, request.effective_shift)
    passes = passes_for(request.text_scale, request.audio_scale)
    step_cache = describe_step_cache(request.step_cache, request.cache_threshold, request.size, sampler.steps)
    mode_lines = fast_mode_lines(load, request, sampling_only=True)
    chunks = None
    if audio_frames is not None:
        chunks = plan_chunks(audio_frames, max_frames(request), request.frame_num, request.motion_frames)
    return RequestPlan(request, sampler, passes, step_cache, mode_lines, chunks)


def check_resumable(request: GenerateOptions, resume, seed: int) -> int:
    """The seed of a checkpointed run: the saved one when resuming (`resume`: the pipeline's `ChunkState`, whose
    `seed` it was); a request naming another seed is not this run."""
    if request.frame_num - request.motion_frames < request.motion_frames:
        raise OptionError(f"checkpoints need frame_num - motion_frames >= motion_frames (got {request.frame_num} and "
                          f"{request.motion_frames}): a chunk's new frames must hold the next chunk's context")
    if resume is None:
        return seed
    if request.seed is not None and request.seed != resume.seed:
        raise InputError(f"cannot resume: the saved run used seed {resume.seed}, the request asks for {request.seed}")
    return resume.seed
