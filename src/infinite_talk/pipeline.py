"""InfiniteTalkPipeline: `load_models(options)` then `generate(request)` → an mp4 with audio and a JSON sidecar.

One validated options object per call (`LoadOptions`, `GenerateOptions`); every choice is resolved to what runs and
recorded (`requested` vs `effective`). Errors the user can fix are `InfiniteTalkError`s with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import CancelledError, InputError, Interrupted, NotLoadedError
from .loading import LoadedModels, LoadedPlan, load_models, refuse_double_quantization, resolve_model_files
from .media.audio import load_audio, load_audio_original, loudness_normalize
from .media.color import ColorMatcher, color_correct
from .media.frames import FrameSource, bucket_for, person_masks, resize_and_centercrop
from .media.frames_hash import FramesHash, hashed
from .media.mp4 import Mp4Writer, frames_to_uint8, soundtrack_rate
from .media.request_check import CheckedRequest, check_request
from .model_files import ModelFiles
from .models.configs import Geometry
from .models.offload import release
from .options import GenerateOptions, LoadOptions, to_dict
from .parallel.launch import PeerError, bind_device, raise_on_sigterm, start_group, stop_group, world_from_env
from .parallel.peers import Leader
from .plan.memory import out_of_memory_error
from .plan.planner import resolve
from .plan.probe import probe
from .request_plan import check_resumable, plan_request
from .sampling.loop import ChunkLoop, Conditioning
from .sampling.schedules import make_sampler
from .sampling.step_cache import make_step_cache
from .sampling.windows import FPS


@dataclass
class GenerateResult:
    video_path: Path
    sidecar_path: Path
    frames: int
    duration_s: float
    seed: int
    sidecar: dict


@dataclass
class ChunkState:
    """Where a run stands after a finished chunk: enough to continue it with the same frames as an unbroken run.

    `generate(on_checkpoint=f)` calls `f(state, frames)` after every chunk (frames: that chunk's uint8 output frames);
    `generate(resume=state)` continues from it, with `earlier_frames` = the frames of chunks `0..next_chunk-1` in
    order (they are muxed again into the new mp4)."""

    next_chunk: int
    num_chunks: int
    seed: int
    frames_written: int
    generator_state: torch.Tensor  # CPU noise generator after this chunk's draw
    context_frames: torch.Tensor  # [1,3,motion_frames,H,W] in [-1,1]: the next chunk's (colour-corrected) context
    stats: dict  # loop statistics so far, so the sidecar counts every chunk of the job
    earlier_frames: Iterable[np.ndarray] | None = None


class InfiniteTalkPipeline:
    """Generation with loaded models; `generate` may be called any number of times.

    Given its components (`loading.load_models` makes them, as `LoadedModels`), or empty and filled by
    `load_models(options)`, the convenience the CLI, UI and service use."""

    def __init__(self, transformer=None, vae=None, text_encoder=None, image_encoder=None, audio_encoder=None,
                 load_plan: LoadedPlan | None = None):
        self._hold(transformer, vae, text_encoder, image_encoder, audio_encoder, load_plan)
        self.peers = None  # parallel.peers.Leader when this is rank 0 of a multi-process (torchrun) job

    def _hold(self, transformer, vae, text_encoder, image_encoder, audio_encoder, load_plan: LoadedPlan | None):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.image_encoder, self.audio_encoder = text_encoder, image_encoder, audio_encoder
        self.load_plan = load_plan
        self.load_options: LoadOptions | None = load_plan.options if load_plan else None
        self.files: ModelFiles | None = load_plan.files if load_plan else None
        self.geometry: Geometry | None = load_plan.geometry if load_plan else None
        self.device = load_plan.device if load_plan else torch.device("cpu")

    @classmethod
    def from_loaded(cls, loaded: LoadedModels) -> InfiniteTalkPipeline:
        return cls(loaded.transformer, loaded.vae, loaded.text_encoder, loaded.image_encoder, loaded.audio_encoder,
                   loaded.report)

    # ------------------------------------------------------------------------------------------------- loading

    def load_models(self, options: LoadOptions, progress: Callable[[str], None] | None = None) -> LoadedPlan:
        """Resolve the plan (refusing what cannot run), find and validate every file, then load the models
        (loading.py) and hold them. Returns what was loaded and how."""
        options.validate()
        say = progress or (lambda msg: None)
        world = world_from_env()
        bind_device(world)  # torchrun: this process's GPU before the probe touches CUDA
        plan = resolve(options, probe(), world)
        parallel = self._join_processes(world, plan) if plan.world_size > 1 else None
        files, geometry = resolve_model_files(options, say)
        if self.peers is not None:
            self.peers.files_ready(to_dict(options))  # the other processes load their transformer now
        refuse_double_quantization(plan, files)
        loaded = load_models(plan, options, files, geometry, say, parallel)
        self._hold(loaded.transformer, loaded.vae, loaded.text_encoder, loaded.image_encoder, loaded.audio_encoder,
                   loaded.report)
        return loaded.report

    def _join_processes(self, world, plan):
        """Rank 0 of a torchrun job: join the process group; the other processes follow (parallel/peers.py)."""
        if self.peers is None:
            parallel = start_group(world, plan)
            self.peers = Leader(world, parallel)
            raise_on_sigterm("stopped by SIGTERM: another process of the job failed (torchrun stops the job) or the "
                             "job was terminated")
        if (self.peers.parallel.ulysses, self.peers.parallel.ring) != (plan.ulysses, plan.ring):
            raise PeerError("the processes of this job are already split as "
                            f"{self.peers.parallel.describe()}; start a new job to change ulysses/ring")
        return self.peers.parallel

    def release_processes(self) -> None:
        """Multi-process job: tell the other processes that the job is over (they exit), and leave the group."""
        if self.peers is not None:
            if self.peers.close():
                stop_group(leader=True)
            self.peers = None

    def _require_models(self) -> None:
        for name, label in (("vae", "VAE"), ("transformer", "Transformer"), ("text_encoder", "Text encoder"),
                            ("image_encoder", "Image encoder"), ("audio_encoder", "Audio encoder")):
            if getattr(self, name) is None:
                raise NotLoadedError(f"{label} is not loaded — load models first")

    # ---------------------------------------------------------------------------------------------- generation

    def _audio_tracks(self, request: GenerateOptions, checked: CheckedRequest
                      ) -> tuple[list[np.ndarray], tuple[np.ndarray, int], dict]:
        """16 kHz loudness-normalised model tracks per person, the soundtrack to mux (1 or 2 channels at a rate AAC
        takes), and what became of the soundtrack (for the sidecar)."""
        paths = [request.audio] + ([request.audio2] if request.audio2 else [])
        raw = [load_audio(p) for p in paths]
        tracks = [loudness_normalize(w) for w in raw]
        if len(tracks) == 1:
            info = checked.audio[0]
            samples, rate = load_audio_original(request.audio, soundtrack_rate(info.rate))
            record = {"source_channels": info.channels, "source_rate": info.rate, "channels": samples.shape[0],
                      "rate": rate}
            if info.channels > 2:
                record["note"] = f"{info.channels} channels averaged to mono (as the model hears them)"
            if rate != info.rate:
                record["rate_note"] = f"resampled from {info.rate} Hz: AAC does not take that rate"
            return tracks, (samples, rate), record
        a, b = tracks
        ra, rb = raw
        if request.audio_mode == "para":  # D6: pad the shorter track instead of failing
            n = max(len(a), len(b))
            tracks = [np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))]
            mix = np.pad(ra, (0, n - len(ra))) + np.pad(rb, (0, n - len(rb)))
        else:  # add: speaker 1 then speaker 2, each silent while the other speaks
            tracks = [np.concatenate([a, np.zeros_like(b)]), np.concatenate([np.zeros_like(a), b])]
            mix = np.concatenate([ra, rb])
        peak = float(np.abs(mix).max()) if mix.size else 0.0
        if peak > 1.0:
            mix = mix / peak
        record = {"source_channels": [a.channels for a in checked.audio], "channels": 1, "rate": 16000,
                  "note": f"the two speakers mixed to mono at 16 kHz ({request.audio_mode})"}
        return tracks, (mix[None].astype(np.float32), 16000), record

    def generate(
        self,
        request: GenerateOptions,
        progress: Callable[[dict], None] | None = None,
        on_chunk: Callable[[int, np.ndarray], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[[ChunkState, np.ndarray], None] | None = None,
        resume: ChunkState | None = None,
        checked: CheckedRequest | None = None,
    ) -> GenerateResult:
        """Make the video. `progress` gets chunk/step/ETA dicts, `on_chunk(k, uint8 frames [t,H,W,3])` each chunk's
        new frames (previews). On cancel or failure the frames finished so far are kept in the mp4.
        `on_checkpoint` / `resume`: see `ChunkState` (a resumed run gives the frames of an unbroken one).
        `checked`: the caller's `check_request` of this very request (the CLI checks before loading); used instead of
        checking again when it matches, else the request is checked here."""
        request.validate()
        self._require_models()
        if self.peers is not None:
            self.peers.check_request(request)
            self.peers.start_run()
        checkpoint = on_checkpoint is not None
        if checked is None or checked.request != request or checked.checkpoint != checkpoint:
            checked = check_request(request, checkpoint=checkpoint)
        out_path = checked.out
        out_path.parent.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        started = time.monotonic()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        if on_checkpoint is not None or resume is not None:
            seed = check_resumable(request, resume, seed)

        t = time.monotonic()
        source = FrameSource(request.image or request.video)
        first = source.first_frame()
        target = self.geometry.frame_size(bucket_for(first.size[1], first.size[0], request.size))
        reference = resize_and_centercrop(first, target)
        tracks, soundtrack, soundtrack_record = self._audio_tracks(request, checked)
        persons = len(tracks)
        masks = person_masks(first.size[1], first.size[0], target, persons, request.bbox)
        timings["inputs_s"] = time.monotonic() - t

        t = time.monotonic()
        embeddings = [self.audio_encoder.embed(w).float() for w in tracks]
        if min(e.shape[0] for e in embeddings) < 1:
            raise InputError(f"{request.audio}: the audio is shorter than one video frame (40 ms); give longer speech")
        timings["audio_encoder_s"] = time.monotonic() - t

        plan_info = plan_request(request, embeddings[0].shape[0], self.load_options)
        chunks = plan_info.chunks_for([e.shape[0] for e in embeddings])

        t = time.monotonic()
        prompt_ctx, negative_ctx = self.text_encoder.encode([request.prompt, request.negative_prompt])
        prompt_tokens = self.text_encoder.token_report(request.prompt, request.negative_prompt)
        timings["text_encoder_s"] = time.monotonic() - t

        def keyframe(k: int):
            if not source.is_video:
                return "image", reference
            frame_time = chunks.keyframe_time(k)  # D13: by time, at the source's own frame rate
            index = source.index_at(frame_time)
            return index, resize_and_centercrop(source.frame_at(frame_time), target)

        strength = request.effective_color_correction
        matcher = ColorMatcher(reference) if strength > 0 else None
        cond = Conditioning(prompt_ctx, negative_ctx, embeddings, masks, keyframe,
                            reference if matcher is not None else None, strength)
        loop = ChunkLoop(
            self.transformer, self.vae, self.image_encoder,
            lambda: make_sampler(request.scheduler, request.steps, request.effective_shift),
            text_scale=request.text_scale, audio_scale=request.audio_scale, use_apg=request.use_apg,
            color_correct=(lambda video, _ref, s: color_correct(video, matcher, s)) if matcher else None,
            device=self.device,
            step_cache=make_step_cache(self.transformer, request.step_cache, request.cache_threshold, request.size),
            peers=self.peers,
        )
        generator = torch.Generator().manual_seed(seed)
        written = {"frames": 0}
        writer = Mp4Writer(out_path, fps=FPS, audio=soundtrack)
        digest = FramesHash()  # frames_sha256, as the job service computes it (earlier chunks of a resume included)
        if resume is not None:
            resume = dataclasses.replace(resume, earlier_frames=hashed(resume.earlier_frames or (), digest))

        def on_frames(k: int, video: torch.Tensor) -> None:
            keep = min(video.shape[1], chunks.num_frames - written["frames"])
            frames = frames_to_uint8(video[:, :keep])
            writer.append(frames)
            digest.update(frames)
            written["frames"] += keep
            if on_chunk is not None:
                on_chunk(k, frames.numpy() if isinstance(frames, torch.Tensor) else frames)
            if on_checkpoint is not None:  # video ends with the next chunk's context (stride ≥ motion_frames)
                stats = {**dataclasses.asdict(loop.stats), "chunks_done": k + 1}
                on_checkpoint(ChunkState(k + 1, chunks.num_chunks, seed, written["frames"], generator.get_state(),
                                         video[:, -request.motion_frames:][None].clone(), stats),
                              frames.numpy() if isinstance(frames, torch.Tensor) else frames)

        status, error, out_of_memory, peer_error, interrupted, failure = "completed", None, None, None, False, None
        t = time.monotonic()
        start_chunk, context = 0, None
        try:
            if resume is not None:
                start_chunk, context = _resume_into(resume, chunks, generator, loop, writer, written)
            with torch.inference_mode():
                loop.run(chunks, cond, generator, on_frames=on_frames, progress=progress, should_stop=should_stop,
                         start_chunk=start_chunk, context_frames=context)
        except CancelledError as err:
            status, error = "cancelled", str(err)
        except PeerError as err:  # another process of the torchrun job failed; raised below with the frames kept
            status, error, peer_error = "failed", str(err), err
        except torch.OutOfMemoryError:  # = torch.cuda.OutOfMemoryError; raised below, after the sidecar is written
            out_of_memory = self._out_of_memory(request, target, persons, chunks, loop, written["frames"], out_path)
            status, error = "failed", str(out_of_memory)
        except KeyboardInterrupt:  # Ctrl-C: the finished frames are kept; raised below as Interrupted
            status, error, interrupted = "interrupted", "interrupted (Ctrl-C / SIGINT)", True
        except BaseException as err:
            status, error, failure = "failed", f"{type(err).__name__}: {err}", err
            raise
        finally:
            timings["sampling_s"] = time.monotonic() - t
            video_error = _finish_video(writer, written["frames"])
            kept = _kept_text(written["frames"], out_path, video_error)
            if failure is not None:
                failure.add_note(kept)
            elif video_error is not None:
                status, error = "failed", f"the video could not be finished: {video_error}"
            timings["total_s"] = time.monotonic() - started
            sidecar = self._sidecar(request, seed, plan_info.as_dict(), chunks, loop, timings, status, error, written["frames"],
                                    source, persons, target, checked, soundtrack_record, prompt_tokens)
            sidecar["output"]["frames_sha256"] = digest.hexdigest()
            sidecar["output"]["video_saved"] = bool(written["frames"]) and video_error is None
            if start_chunk:
                sidecar["output"]["resumed_from_chunk"] = start_chunk
            sidecar_path = out_path.with_suffix(".json")
            sidecar_error = _write_sidecar(sidecar_path, sidecar)
        if sidecar_error is not None:
            raise InputError(f"{sidecar_path}: the run's record could not be written ({sidecar_error}); {kept}")
        if interrupted:
            raise Interrupted(f"{error}; {kept}; the record is in {sidecar_path}")
        if status == "cancelled":
            raise CancelledError(f"{error}; {kept}")
        if out_of_memory is not None:  # raised outside the except clause: the failed call's tensors are freed
            if video_error is not None:
                out_of_memory.add_note(kept)
            raise out_of_memory
        if peer_error is not None:
            raise PeerError(f"{peer_error}; {kept}")
        if video_error is not None:
            raise InputError(f"{out_path}: {kept}; the record is in {sidecar_path}")
        return GenerateResult(out_path, sidecar_path, written["frames"], written["frames"] / FPS, seed, sidecar)

    def _sidecar(self, request, seed, plan_info, chunks, loop, timings, status, error, frames, source, persons,
                 target, checked, soundtrack, prompt_tokens) -> dict:
        requested = to_dict(request)  # the prompt is stored here only
        effective = {
            **plan_info,
            "steps": plan_info["steps"],
            "scheduler": plan_info["scheduler"]["name"],
            "scheduler_plan": plan_info["scheduler"],
            "seed": seed,
            "speakers": persons,
            "resolution": list(target),
            **{name: self._effective(name) for name in ("model_precision", "vae_precision", "quantization",
                                                         "attention", "device", "offload", "vae_tiling",
                                                         "sequence_parallel")},
            "attention_backend": self.load_plan.plan.attention_backend if self.load_plan else None,
            "model_calls": loop.stats.model_calls,
            "model_calls_per_chunk": loop.stats.calls_per_chunk,
            "cache_skips": sum(loop.stats.cache_skips_per_chunk),
            "cache_skips_per_chunk": loop.stats.cache_skips_per_chunk,
            "prompt_tokens": prompt_tokens,
            "soundtrack": soundtrack,
        }
        return {
            "status": status,
            "error": error,
            "inputs": {"reference": request.image or request.video, "reference_is_video": source.is_video,
                       "reference_size": [checked.reference.width, checked.reference.height],
                       "audio": [p for p in (request.audio, request.audio2) if p],
                       "audio_files": [{"channels": a.channels, "rate": a.rate, "seconds": round(a.seconds, 3),
                                        "codec": a.codec} for a in checked.audio]},
            "notes": [*checked.notes, *([prompt_tokens["note"]] if prompt_tokens.get("note") else [])],
            "seed": seed,
            "requested": requested,
            "effective": effective,
            "load": {"requested": to_dict(self.load_options) if self.load_options else None,
                     "effective": self.load_plan.as_dict() if self.load_plan else None},
            "output": {"frames": frames, "fps": FPS, "duration_s": frames / FPS,
                       "planned_frames": chunks.num_frames, "chunks_done": loop.stats.chunks_done,
                       "chunks": chunks.num_chunks},
            "timings_s": {k: round(v, 3) for k, v in {**timings, **loop.stats.seconds}.items()},
            "memory": _memory_record(self.load_plan, self.device),
            "versions": _versions(),
        }

    def _effective(self, option: str) -> str | None:
        """What the loaded models run for a load option (the plan's `effective`)."""
        resolved = self.load_plan.plan.options.get(option) if self.load_plan else None
        return resolved.effective if resolved else None

    def _out_of_memory(self, request, target, persons, chunks, loop, frames_done, out_path):
        """The GPU ran out of memory in a chunk: swapped weights go back to host memory, and the error names a
        setting the memory plan estimates to fit (plan/memory.py)."""
        release(self.transformer)
        return out_of_memory_error(self.load_plan.memory if self.load_plan else None, target, request.frame_num, persons, loop.stats.chunks_done + 1,
                                   chunks.num_chunks, frames_done, out_path)


def _memory_record(load_plan: LoadedPlan | None, device: torch.device) -> dict:
    """The plan's estimate next to what this process really used (GPU peak since the process started)."""
    memory = load_plan.memory if load_plan else None
    planned = memory.estimate.to_dict() if memory is not None and memory.estimate is not None else None
    measured = None
    if device.type == "cuda":
        measured = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    return {"planned": planned, "measured": measured}


def _resume_into(resume: ChunkState, chunks, generator: torch.Generator, loop: ChunkLoop, writer: Mp4Writer,
                 written: dict) -> tuple[int, torch.Tensor]:
    """Put the run where `resume` left it: the earlier frames muxed again, the noise generator and loop stats restored."""
    if resume.num_chunks != chunks.num_chunks or not 0 < resume.next_chunk <= chunks.num_chunks:
        raise InputError(f"cannot resume: the saved run has {resume.num_chunks} chunks (next {resume.next_chunk}), "
                         f"this request plans {chunks.num_chunks}; the inputs or options differ")
    for frames in resume.earlier_frames or ():
        writer.append(frames)
        written["frames"] += len(frames)
    if written["frames"] != resume.frames_written:
        raise InputError(f"cannot resume: {written['frames']} earlier frames given, the saved run had written "
                         f"{resume.frames_written}")
    generator.set_state(resume.generator_state)
    for name, value in resume.stats.items():
        setattr(loop.stats, name, value)
    return resume.next_chunk, resume.context_frames


def _finish_video(writer: Mp4Writer, frames: int) -> str | None:
    """Close the mp4 (or drop it when no frame was made); the reason when it cannot be finished (a full disk)."""
    try:
        if frames:
            writer.close()
        else:
            writer.abort()
    except Exception as err:  # OSError / av.error.*: the container's index could not be written
        writer.abort()
        return f"{type(err).__name__}: {err}"
    return None


def _kept_text(frames: int, out_path: Path, video_error: str | None = None) -> str:
    """What a run that stopped early leaves behind, in words."""
    if not frames:
        return "no frame was finished, so no video was written"
    if video_error is not None:
        return f"the {frames} generated frames could not be saved: {out_path} could not be finished ({video_error})"
    return f"the {frames} finished frames are kept in {out_path}"


def _write_sidecar(path: Path, sidecar: dict) -> str | None:
    """Write the run's record; the reason when it cannot be written (a full disk), else None."""
    try:
        path.write_text(json.dumps(sidecar, indent=2, default=str))
    except OSError as err:
        return err.strerror or str(err)
    return None


def _versions() -> dict:
    import diffusers
    import transformers

    return {"infinite_talk": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}

