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
from .media.color import ColorMatcher, color_correct
from .media.frames import FrameSource, bucket_for, person_masks, resize_and_centercrop
from .media.frames_hash import FramesHash, hashed
from .media.mp4 import Mp4Writer, frames_to_uint8
from .media.request_check import CheckedRequest, check_request
from .media.tracks import speaker_tracks
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
        self._start_peers(request)
        checked = _checked_again_unless_same(request, checked, checkpoint=on_checkpoint is not None)
        checked.out.parent.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        started = time.monotonic()
        seed = _seed_for(request, resume, checkpointed=on_checkpoint is not None or resume is not None)
        inputs = self._prepare_inputs(request, checked, timings)
        embeddings = self._embed_audio(request, inputs.tracks, timings)
        plan = plan_request(request, embeddings[0].shape[0], self.load_options)
        chunks = plan.chunks_for([e.shape[0] for e in embeddings])
        prompts = self._encode_prompts(request, timings)
        loop, cond = self._chunk_loop(request, inputs, embeddings, prompts, chunks)
        generator = torch.Generator().manual_seed(seed)
        sink = _FrameSink(Mp4Writer(checked.out, fps=FPS, audio=inputs.soundtrack), chunks, loop, generator, seed,
                          request.motion_frames, on_chunk, on_checkpoint)
        if resume is not None:  # frames_sha256 covers the earlier chunks too, as the job service computes it
            resume = dataclasses.replace(resume, earlier_frames=hashed(resume.earlier_frames or (), sink.digest))

        outcome = _Outcome()
        t = time.monotonic()
        try:
            self._sample(chunks, cond, loop, generator, sink, resume, progress, should_stop, outcome)
        except CancelledError as err:
            outcome.status, outcome.error = "cancelled", str(err)
        except PeerError as err:  # another process of the torchrun job failed; raised below with the frames kept
            outcome.status, outcome.error, outcome.peer_error = "failed", str(err), err
        except torch.OutOfMemoryError:  # = torch.cuda.OutOfMemoryError; raised below, after the sidecar is written
            outcome.out_of_memory = self._out_of_memory(request, inputs.target, inputs.persons, chunks, loop,
                                                        sink.frames, checked.out)
            outcome.status, outcome.error = "failed", str(outcome.out_of_memory)
        except KeyboardInterrupt:  # Ctrl-C: the finished frames are kept; raised below as Interrupted
            outcome.status, outcome.error, outcome.interrupted = "interrupted", "interrupted (Ctrl-C / SIGINT)", True
        except BaseException as err:
            outcome.status, outcome.error, outcome.failure = "failed", f"{type(err).__name__}: {err}", err
            raise
        finally:
            timings["sampling_s"] = time.monotonic() - t
            self._close_run(request, checked, inputs, plan, chunks, loop, sink, seed, prompts, outcome, timings,
                            started)
        _raise_for(outcome, checked.out)
        return GenerateResult(checked.out, outcome.sidecar_path, sink.frames, sink.frames / FPS, seed,
                              outcome.sidecar)

    # steps of `generate`, in order

    def _start_peers(self, request: GenerateOptions) -> None:
        """A torchrun job: the other processes check the request and get ready for its transformer calls."""
        if self.peers is not None:
            self.peers.check_request(request)
            self.peers.start_run()

    def _prepare_inputs(self, request: GenerateOptions, checked: CheckedRequest, timings: dict) -> _Inputs:
        """The reference at the bucket's frame size, the speakers' model tracks, the soundtrack, the person masks."""
        t = time.monotonic()
        source = FrameSource(request.image or request.video)
        first = source.first_frame()
        target = self.geometry.frame_size(bucket_for(first.size[1], first.size[0], request.size))
        reference = resize_and_centercrop(first, target)
        tracks, soundtrack, soundtrack_record = speaker_tracks(request, checked)
        masks = person_masks(first.size[1], first.size[0], target, len(tracks), request.bbox)
        timings["inputs_s"] = time.monotonic() - t
        return _Inputs(source, target, reference, tracks, soundtrack, soundtrack_record, masks)

    def _embed_audio(self, request: GenerateOptions, tracks: list[np.ndarray], timings: dict) -> list[torch.Tensor]:
        """wav2vec2 features per speaker, one row per 25 fps frame."""
        t = time.monotonic()
        embeddings = [self.audio_encoder.embed(w).float() for w in tracks]
        if min(e.shape[0] for e in embeddings) < 1:
            raise InputError(f"{request.audio}: the audio is shorter than one video frame (40 ms); give longer speech")
        timings["audio_encoder_s"] = time.monotonic() - t
        return embeddings

    def _encode_prompts(self, request: GenerateOptions, timings: dict) -> _Prompts:
        t = time.monotonic()
        positive, negative = self.text_encoder.encode([request.prompt, request.negative_prompt])
        tokens = self.text_encoder.token_report(request.prompt, request.negative_prompt)
        timings["text_encoder_s"] = time.monotonic() - t
        return _Prompts(positive, negative, tokens)

    def _chunk_loop(self, request: GenerateOptions, inputs: _Inputs, embeddings, prompts: _Prompts,
                    chunks) -> tuple[ChunkLoop, Conditioning]:
        """The sampling loop over the chunks, and what conditions every chunk (prompts, audio, masks, keyframes)."""
        source, target, reference = inputs.source, inputs.target, inputs.reference

        def keyframe(k: int):
            if not source.is_video:
                return "image", reference
            frame_time = chunks.keyframe_time(k)  # D13: by time, at the source's own frame rate
            index = source.index_at(frame_time)
            return index, resize_and_centercrop(source.frame_at(frame_time), target)

        strength = request.effective_color_correction
        matcher = ColorMatcher(reference) if strength > 0 else None
        cond = Conditioning(prompts.positive, prompts.negative, embeddings, inputs.masks, keyframe,
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
        return loop, cond

    def _sample(self, chunks, cond, loop, generator, sink, resume, progress, should_stop, outcome) -> None:
        """Run the chunks, from where `resume` left off (`outcome.start_chunk`)."""
        context = None
        if resume is not None:
            outcome.start_chunk, context = _resume_into(resume, chunks, generator, loop, sink)
        with torch.inference_mode():
            loop.run(chunks, cond, generator, on_frames=sink, progress=progress, should_stop=should_stop,
                     start_chunk=outcome.start_chunk, context_frames=context)

    def _close_run(self, request, checked, inputs, plan, chunks, loop, sink, seed, prompts, outcome, timings,
                   started) -> None:
        """Finish the mp4 (or drop it when no frame was made) and write the run's record next to it, whatever
        happened; `outcome` gets what the caller must raise."""
        outcome.video_error = _finish_video(sink.writer, sink.frames)
        outcome.kept = _kept_text(sink.frames, checked.out, outcome.video_error)
        if outcome.failure is not None:
            outcome.failure.add_note(outcome.kept)
        elif outcome.video_error is not None:
            outcome.status, outcome.error = "failed", f"the video could not be finished: {outcome.video_error}"
        timings["total_s"] = time.monotonic() - started
        sidecar = self._sidecar(request, seed, plan.as_dict(), chunks, loop, timings, outcome.status, outcome.error,
                                sink.frames, inputs.source, inputs.persons, inputs.target, checked,
                                inputs.soundtrack_record, prompts.tokens)
        sidecar["output"]["frames_sha256"] = sink.digest.hexdigest()
        sidecar["output"]["video_saved"] = bool(sink.frames) and outcome.video_error is None
        if outcome.start_chunk:
            sidecar["output"]["resumed_from_chunk"] = outcome.start_chunk
        outcome.sidecar, outcome.sidecar_path = sidecar, checked.out.with_suffix(".json")
        outcome.sidecar_error = _write_sidecar(outcome.sidecar_path, sidecar)

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


@dataclass
class _Inputs:
    """A request's inputs as the model takes them (`_prepare_inputs`)."""

    source: FrameSource
    target: tuple[int, int]  # (height, width) of the generated frames
    reference: object  # the first frame, resized and centre-cropped to `target`
    tracks: list[np.ndarray]  # 16 kHz model track per speaker
    soundtrack: tuple[np.ndarray, int]  # what is muxed into the mp4
    soundtrack_record: dict
    masks: object

    @property
    def persons(self) -> int:
        return len(self.tracks)


@dataclass
class _Prompts:
    positive: torch.Tensor
    negative: torch.Tensor
    tokens: dict  # the token report for the sidecar


class _FrameSink:
    """Where each finished chunk's frames go (`ChunkLoop.run(on_frames=...)`): the mp4, the frames hash, the
    caller's previews (`on_chunk`) and checkpoints (`on_checkpoint`)."""

    def __init__(self, writer: Mp4Writer, chunks, loop: ChunkLoop, generator: torch.Generator, seed: int,
                 motion_frames: int, on_chunk=None, on_checkpoint=None):
        self.writer, self.chunks, self.loop, self.generator, self.seed = writer, chunks, loop, generator, seed
        self.motion_frames, self.on_chunk, self.on_checkpoint = motion_frames, on_chunk, on_checkpoint
        self.digest = FramesHash()  # frames_sha256, as the job service computes it (earlier chunks of a resume too)
        self.frames = 0  # written to the mp4 so far

    def __call__(self, k: int, video: torch.Tensor) -> None:
        keep = min(video.shape[1], self.chunks.num_frames - self.frames)
        frames = frames_to_uint8(video[:, :keep])
        self.writer.append(frames)
        self.digest.update(frames)
        self.frames += keep
        if self.on_chunk is not None:
            self.on_chunk(k, frames.numpy() if isinstance(frames, torch.Tensor) else frames)
        if self.on_checkpoint is not None:  # video ends with the next chunk's context (stride ≥ motion_frames)
            stats = {**dataclasses.asdict(self.loop.stats), "chunks_done": k + 1}
            state = ChunkState(k + 1, self.chunks.num_chunks, self.seed, self.frames, self.generator.get_state(),
                               video[:, -self.motion_frames:][None].clone(), stats)
            self.on_checkpoint(state, frames.numpy() if isinstance(frames, torch.Tensor) else frames)


@dataclass
class _Outcome:
    """How the sampling ended, and what `generate` raises for it once the mp4 and the record are written."""

    status: str = "completed"
    error: str | None = None
    out_of_memory: Exception | None = None
    peer_error: PeerError | None = None
    interrupted: bool = False
    failure: BaseException | None = None
    start_chunk: int = 0  # > 0 when this run resumed a checkpointed one
    video_error: str | None = None
    kept: str = ""
    sidecar: dict | None = None
    sidecar_path: Path | None = None
    sidecar_error: str | None = None


def _checked_again_unless_same(request: GenerateOptions, checked: CheckedRequest | None,
                               checkpoint: bool) -> CheckedRequest:
    """The caller's check of this very request, else a fresh `check_request`."""
    if checked is None or checked.request != request or checked.checkpoint != checkpoint:
        checked = check_request(request, checkpoint=checkpoint)
    return checked


def _seed_for(request: GenerateOptions, resume: ChunkState | None, checkpointed: bool) -> int:
    """The request's seed, a random one when unset, or the resumed run's (`check_resumable`)."""
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    return check_resumable(request, resume, seed) if checkpointed else seed


def _raise_for(outcome: _Outcome, out_path: Path) -> None:
    """A run that did not complete ends in one error that says what was kept and where the record is."""
    kept, sidecar_path = outcome.kept, outcome.sidecar_path
    if outcome.sidecar_error is not None:
        raise InputError(f"{sidecar_path}: the run's record could not be written ({outcome.sidecar_error}); {kept}")
    if outcome.interrupted:
        raise Interrupted(f"{outcome.error}; {kept}; the record is in {sidecar_path}")
    if outcome.status == "cancelled":
        raise CancelledError(f"{outcome.error}; {kept}")
    if outcome.out_of_memory is not None:  # raised outside the except clause: the failed call's tensors are freed
        if outcome.video_error is not None:
            outcome.out_of_memory.add_note(kept)
        raise outcome.out_of_memory
    if outcome.peer_error is not None:
        raise PeerError(f"{outcome.peer_error}; {kept}")
    if outcome.video_error is not None:
        raise InputError(f"{out_path}: {kept}; the record is in {sidecar_path}")


def _resume_into(resume: ChunkState, chunks, generator: torch.Generator, loop: ChunkLoop,
                 sink: _FrameSink) -> tuple[int, torch.Tensor]:
    """Put the run where `resume` left it: the earlier frames muxed again, the noise generator and loop stats restored."""
    if resume.num_chunks != chunks.num_chunks or not 0 < resume.next_chunk <= chunks.num_chunks:
        raise InputError(f"cannot resume: the saved run has {resume.num_chunks} chunks (next {resume.next_chunk}), "
                         f"this request plans {chunks.num_chunks}; the inputs or options differ")
    for frames in resume.earlier_frames or ():
        sink.writer.append(frames)
        sink.frames += len(frames)
    if sink.frames != resume.frames_written:
        raise InputError(f"cannot resume: {sink.frames} earlier frames given, the saved run had written "
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

