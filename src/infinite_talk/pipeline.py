"""InfiniteTalkPipeline: `load_models(options)` then `generate(request)` → an mp4 with audio and a JSON sidecar.

One validated options object per call (`LoadOptions`, `GenerateOptions`); every choice is resolved to what runs and
recorded (`requested` vs `effective`). Errors the user can fix are `InfiniteTalkError`s with the fix in the message.
"""

from __future__ import annotations

import json
import platform
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import CancelledError, InputError, NotLoadedError
from .media.audio import load_audio, load_audio_original, loudness_normalize
from .media.color import ColorMatcher, color_correct
from .media.frames import FrameSource, bucket_for, person_masks, resize_and_centercrop
from .media.mp4 import Mp4Writer, frames_to_uint8
from .model_files import ModelFiles, resolve_model_files
from .models.configs import Geometry
from .options import GenerateOptions, LoadOptions, to_dict
from .sampling.guidance import passes_for
from .sampling.loop import ChunkLoop, Conditioning
from .sampling.schedules import describe as describe_sampler
from .sampling.schedules import make_sampler
from .sampling.windows import FPS, plan_chunks


@dataclass
class GenerateResult:
    video_path: Path
    sidecar_path: Path
    frames: int
    duration_s: float
    seed: int
    sidecar: dict


class InfiniteTalkPipeline:
    """Holds the loaded models; `generate` may be called any number of times."""

    def __init__(self):
        self.transformer = self.vae = self.text_encoder = self.image_encoder = self.audio_encoder = None
        self.load_options: LoadOptions | None = None
        self.load_plan: dict | None = None
        self.files: ModelFiles | None = None
        self.geometry: Geometry | None = None
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------------------------------------- loading

    def load_models(self, options: LoadOptions, progress: Callable[[str], None] | None = None) -> dict:
        """Resolve the plan (refusing what cannot run), find and validate every file, then load the models."""
        from .plan.planner import resolve
        from .plan.probe import probe

        options.validate()
        say = progress or (lambda msg: None)
        plan = resolve(options, probe())
        device = torch.device(plan.device)
        files, geometry = resolve_model_files(options, say)

        from .models.audio_encoder import load_audio_encoder
        from .models.image_encoder import load_image_encoder
        from .models.quantize import quantize_text_encoder, quantize_transformer
        from .models.text_encoder import load_text_encoder
        from .models.transformer_loading import load_transformer
        from .models.vae import load_vae

        say("loading transformer")
        # Quantized runs load on the CPU and quantize layer by layer on the way to the device: the device never holds
        # the full-precision model.
        load_device = device if plan.quantization == "disabled" else torch.device("cpu")
        transformer = load_transformer(files.transformer, files.adapter, geometry, dtype=plan.torch_dtype,
                                       device=load_device)
        # (LoRA merges belong here: into the full-precision weights, before quantization.)
        if plan.quantization != "disabled":
            say(f"quantizing transformer ({plan.quantization})")
        quantization = quantize_transformer(transformer, plan.quantization, device)
        transformer.set_attention_backend(plan.attention_backend)
        say("loading VAE")
        vae = load_vae(files.vae, geometry, device=device, dtype=plan.vae_torch_dtype)
        say("loading text encoder")
        text_encoder = load_text_encoder(files.t5, files.t5_tokenizer, geometry, device=device,
                                         dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
        t5_quantization = quantize_text_encoder(text_encoder.model, options.t5_quantization)
        say("loading image encoder")
        image_encoder = load_image_encoder(files.clip, geometry, device=device,
                                           dtype=torch.float32 if device.type == "cpu" else torch.float16)
        say("loading audio encoder")
        audio_encoder = load_audio_encoder(files.wav2vec, geometry, device="cpu", dtype=torch.float32)

        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.image_encoder, self.audio_encoder = text_encoder, image_encoder, audio_encoder
        self.load_options, self.files, self.geometry, self.device = options, files, geometry, device
        self.load_plan = plan.to_dict()
        self.load_plan["lines"] = plan.lines()
        self.load_plan["files"] = files.as_dict()
        self.load_plan["geometry"] = geometry.name
        self.load_plan["quantization_report"] = {"transformer": quantization, "t5": t5_quantization}
        self.load_plan["notes"] = [n for n in (getattr(audio_encoder, "warning", None),) if n]
        return self.load_plan

    def _require_models(self) -> None:
        for name, label in (("vae", "VAE"), ("transformer", "Transformer"), ("text_encoder", "Text encoder"),
                            ("image_encoder", "Image encoder"), ("audio_encoder", "Audio encoder")):
            if getattr(self, name) is None:
                raise NotLoadedError(f"{label} is not loaded — load models first")

    # ------------------------------------------------------------------------------------------------ planning

    def plan_request(self, request: GenerateOptions, audio_frames: int | None = None) -> dict:
        """What `generate` will run for this request: scheduler, real steps, passes, chunks (if the length is known)."""
        request.validate()
        sampler = describe_sampler(request.scheduler, request.steps, request.effective_shift)
        passes = passes_for(request.text_scale, request.audio_scale)
        out = {
            "scheduler": sampler.as_dict(),
            "steps": sampler.steps,
            "passes_per_step": len(passes),
            "passes": passes,
            "shift": request.effective_shift,
            "text_scale": request.text_scale,
            "audio_scale": request.audio_scale,
            "apg": request.use_apg,
            "color_correction": request.effective_color_correction,
            "size": request.size,
            "max_seconds": request.max_seconds,
        }
        if audio_frames is not None:
            max_frames = None if request.max_seconds is None else max(1, int(round(request.max_seconds * FPS)))
            chunks = plan_chunks(audio_frames, max_frames, request.frame_num, request.motion_frames)
            out["chunks"] = chunks.as_dict()
            out["model_calls"] = chunks.num_chunks * sampler.steps * len(passes)
        return out

    # ---------------------------------------------------------------------------------------------- generation

    def _audio_tracks(self, request: GenerateOptions) -> tuple[list[np.ndarray], tuple[np.ndarray, int]]:
        """16 kHz loudness-normalised model tracks per person, and the soundtrack to mux."""
        if not request.audio:
            raise InputError("no speech audio given: pass --audio PATH (wav/mp3/flac/m4a/ogg or a video)")
        paths = [request.audio] + ([request.audio2] if request.audio2 else [])
        raw = [load_audio(p) for p in paths]
        tracks = [loudness_normalize(w) for w in raw]
        if len(tracks) == 1:
            samples, rate = load_audio_original(request.audio)
            return tracks, (samples, rate)
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
        return tracks, (mix[None].astype(np.float32), 16000)

    def generate(
        self,
        request: GenerateOptions,
        progress: Callable[[dict], None] | None = None,
        on_chunk: Callable[[int, np.ndarray], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerateResult:
        """Make the video. `progress` gets chunk/step/ETA dicts, `on_chunk(k, uint8 frames [t,H,W,3])` each chunk's
        new frames (previews). On cancel or failure the frames finished so far are kept in the mp4."""
        request.validate()
        self._require_models()
        if bool(request.image) == bool(request.video):
            raise InputError("give exactly one reference: --image PATH (image-to-video) or --video PATH (dubbing)")
        if not request.out:
            raise InputError("no output path: pass --out FILE.mp4")
        out_path = Path(request.out)
        if out_path.suffix.lower() != ".mp4":
            raise InputError(f"{out_path}: the output must be an .mp4 file")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        started = time.monotonic()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)

        t = time.monotonic()
        source = FrameSource(request.image or request.video)
        first = source.first_frame()
        target = self.geometry.frame_size(bucket_for(first.size[1], first.size[0], request.size))
        reference = resize_and_centercrop(first, target)
        tracks, soundtrack = self._audio_tracks(request)
        persons = len(tracks)
        masks = person_masks(first.size[1], first.size[0], target, persons, request.bbox)
        timings["inputs_s"] = time.monotonic() - t

        t = time.monotonic()
        embeddings = [self.audio_encoder.embed(w).float() for w in tracks]
        if min(e.shape[0] for e in embeddings) < 1:
            raise InputError(f"{request.audio}: the audio is shorter than one video frame (40 ms); give longer speech")
        timings["audio_encoder_s"] = time.monotonic() - t

        plan_info = self.plan_request(request, embeddings[0].shape[0])
        max_frames = None if request.max_seconds is None else max(1, int(round(request.max_seconds * FPS)))
        chunks = plan_chunks([e.shape[0] for e in embeddings], max_frames, request.frame_num, request.motion_frames)

        t = time.monotonic()
        prompt_ctx, negative_ctx = self.text_encoder.encode([request.prompt, request.negative_prompt])
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
        )
        generator = torch.Generator().manual_seed(seed)
        written = {"frames": 0}
        writer = Mp4Writer(out_path, fps=FPS, audio=soundtrack)

        def on_frames(k: int, video: torch.Tensor) -> None:
            keep = min(video.shape[1], chunks.num_frames - written["frames"])
            frames = frames_to_uint8(video[:, :keep])
            writer.append(frames)
            written["frames"] += keep
            if on_chunk is not None:
                on_chunk(k, frames.numpy() if isinstance(frames, torch.Tensor) else frames)

        status, error = "completed", None
        t = time.monotonic()
        try:
            with torch.inference_mode():
                loop.run(chunks, cond, generator, on_frames=on_frames, progress=progress, should_stop=should_stop)
        except CancelledError as err:
            status, error = "cancelled", str(err)
        except BaseException as err:
            status, error = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            timings["sampling_s"] = time.monotonic() - t
            if written["frames"]:
                writer.close()
            else:
                writer.abort()
            timings["total_s"] = time.monotonic() - started
            sidecar = self._sidecar(request, seed, plan_info, chunks, loop, timings, status, error, written["frames"],
                                    source, persons, target)
            sidecar_path = out_path.with_suffix(".json")
            sidecar_path.write_text(json.dumps(sidecar, indent=2, default=str))
        if status == "cancelled":
            raise CancelledError(f"{error}; the {written['frames']} finished frames are in {out_path}")
        return GenerateResult(out_path, sidecar_path, written["frames"], written["frames"] / FPS, seed, sidecar)

    def _sidecar(self, request, seed, plan_info, chunks, loop, timings, status, error, frames, source, persons,
                 target) -> dict:
        requested = to_dict(request)
        effective = {
            **plan_info,
            "steps": plan_info["steps"],
            "scheduler": plan_info["scheduler"]["name"],
            "scheduler_plan": plan_info["scheduler"],
            "seed": seed,
            "speakers": persons,
            "resolution": list(target),
            **{name: (self.load_plan or {}).get("options", {}).get(name, {}).get("effective")
               for name in ("model_precision", "vae_precision", "quantization", "attention", "device")},
            "attention_backend": (self.load_plan or {}).get("attention_backend"),
            "model_calls": loop.stats.model_calls,
            "model_calls_per_chunk": loop.stats.calls_per_chunk,
        }
        return {
            "status": status,
            "error": error,
            "inputs": {"reference": request.image or request.video, "reference_is_video": source.is_video,
                       "audio": [p for p in (request.audio, request.audio2) if p], "prompt": request.prompt},
            "seed": seed,
            "requested": requested,
            "effective": effective,
            "load": {"requested": to_dict(self.load_options) if self.load_options else None,
                     "effective": self.load_plan},
            "output": {"frames": frames, "fps": FPS, "duration_s": frames / FPS,
                       "planned_frames": chunks.num_frames, "chunks_done": loop.stats.chunks_done,
                       "chunks": chunks.num_chunks},
            "timings_s": {k: round(v, 3) for k, v in {**timings, **loop.stats.seconds}.items()},
            "versions": _versions(),
        }


def _versions() -> dict:
    import diffusers
    import transformers

    return {"infinite_talk": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}

