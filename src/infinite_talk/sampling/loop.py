"""The streaming chunk loop (docs/REFERENCE.md §3.3): 81-frame chunks, 9 context frames, 72 new frames per chunk.

Per chunk k: the audio windows of `ChunkPlan.window(k)`; fresh noise; the keyframe (the still image, or the source
video's frame at the chunk's time) gives the CLIP tokens and the reference latent y = VAE([keyframe, 80 zero
frames]) behind a 4-channel mask that is 1 on latent 0 (both cached while the keyframe is unchanged); the context
latents (VAE of the keyframe for chunk 0, of the last 9 decoded, colour-corrected frames after) are written clean
into the first latents before every model call and after every update; the guided prediction of the 3/2/1 passes
drives the sampler for exactly its steps; the decoded chunk is colour-corrected and its new frames are emitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import CancelledError
from .guidance import APGState, combine, passes_for
from .schedules import Sampler
from .windows import ChunkPlan


@dataclass
class Conditioning:
    """Everything the loop needs that does not change per step."""

    prompt_context: torch.Tensor  # [L, text_dim]
    negative_context: torch.Tensor  # [L', text_dim]
    audio_embeddings: list[torch.Tensor]  # per person [frames, layers, channels]
    person_masks: torch.Tensor  # [3, lat_h, lat_w]
    keyframe: Callable[[int], tuple[object, torch.Tensor]]  # chunk -> (cache key, frame [1,3,1,H,W] in [-1,1])
    color_reference: torch.Tensor | None  # [1,3,1,H,W] or None (no colour correction)
    color_strength: float = 0.0


@dataclass
class LoopStats:
    chunks_done: int = 0
    model_calls: int = 0
    calls_per_chunk: list[int] = field(default_factory=list)
    cache_skips_per_chunk: list[int] = field(default_factory=list)  # model calls whose blocks the step cache skipped
    seconds: dict[str, float] = field(default_factory=lambda: {"encode": 0.0, "denoise": 0.0, "decode": 0.0})


class ChunkLoop:
    """Runs the chunks of a `ChunkPlan` with the given models; emits each chunk's new frames."""

    def _elapsed(self, since: float) -> float:
        """Seconds since `since`, once the GPU has finished the queued work: without the wait a stage's GPU time is
        billed to the next one (the last model call showed up as 0.9 s of 'decode' on an H200)."""
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.monotonic() - since

    def __init__(self, transformer, vae, image_encoder, sampler_factory: Callable[[], Sampler], *,
                 text_scale: float, audio_scale: float, use_apg: bool = False, color_correct=None,
                 device: torch.device | str = "cpu", step_cache=None, peers=None):
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder
        self.sampler_factory = sampler_factory
        self.text_scale = text_scale
        self.audio_scale = audio_scale
        self.use_apg = use_apg
        self.color_correct = color_correct
        self.device = torch.device(device)
        self.passes = passes_for(text_scale, audio_scale)
        self.step_cache = step_cache  # sampling.step_cache.StepCache or None
        self.peers = peers  # parallel.peers.Leader: the other processes of a sequence-parallel job run each call too
        self.stats = LoopStats()

    def _model_call(self, latent, t, context, clip_tokens, y, audio, masks, pass_name="cond", step=0,
                    steps=1, chunk=0) -> torch.Tensor:
        self.stats.model_calls += 1
        args = (latent[None], t.reshape(1).to(self.device), context[None], clip_tokens, y[None], audio, masks)

        def call():
            if self.peers is not None:  # inside the step cache's context, as the other processes run it
                return self.peers.forward(lambda: self.transformer(*args), args, step_cache=self.step_cache,
                                          chunk=chunk, pass_name=pass_name, step=step, steps=steps)[0]
            return self.transformer(*args)[0]

        return call() if self.step_cache is None else self.step_cache.call(pass_name, step, steps, call)

    def run(self, *args, **kwargs) -> torch.Tensor | None:
        """See `_run`; the step cache's hooks are removed from the transformer however the run ends."""
        try:
            return self._run(*args, **kwargs)
        finally:
            if self.step_cache is not None:
                self.step_cache.remove()

    def _run(
        self,
        plan: ChunkPlan,
        cond: Conditioning,
        generator: torch.Generator,
        *,
        on_frames: Callable[[int, torch.Tensor], None],
        progress: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        start_chunk: int = 0,
        context_frames: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Generate chunks `start_chunk..`; `on_frames(k, frames [3,t,H,W] in [-1,1])` gets each chunk's new frames.

        Returns the context frames after the last chunk (for resuming). Raises `CancelledError` when `should_stop`
        says so between steps; chunks already emitted are kept by the caller.
        """
        dev, dtype = self.device, torch.float32
        prompt = cond.prompt_context.to(dev)
        negative = cond.negative_context.to(dev)
        masks = cond.person_masks.to(dev)
        cache_key, clip_tokens, ref_latent = object(), None, None
        started = time.monotonic()
        for k in range(start_chunk, plan.num_chunks):
            t0 = time.monotonic()
            key, keyframe = cond.keyframe(k)
            keyframe = keyframe.to(dev, dtype)
            if key != cache_key:  # D20: CLIP and the reference latent only change with the keyframe
                clip_tokens = self.image_encoder.encode(keyframe).to(dev)
                zeros = torch.zeros(1, 3, plan.frame_num - 1, *keyframe.shape[-2:], device=dev, dtype=dtype)
                ref_latent = self.vae.encode(torch.cat([keyframe, zeros], dim=2))[0].to(dev, dtype)
                cache_key = key
            lat_frames, lat_h, lat_w = ref_latent.shape[1:]
            mask = torch.zeros(4, lat_frames, lat_h, lat_w, device=dev, dtype=dtype)
            mask[:, 0] = 1.0
            y = torch.cat([mask, ref_latent], dim=0)
            motion_src = keyframe if k == 0 or context_frames is None else context_frames.to(dev, dtype)
            motion = self.vae.encode(motion_src)[0].to(dev, dtype)
            n_motion = motion.shape[1]

            audio = plan.window(k, cond.audio_embeddings).to(dev, dtype)
            silent = torch.zeros_like(audio[-1:])  # null audio: one person of zeros (docs/REFERENCE.md §3.5)
            inputs = {
                "cond": (prompt, audio), "drop_text": (negative, audio),
                "uncond": (negative, silent), "drop_audio": (prompt, silent),
            }
            self.stats.seconds["encode"] += self._elapsed(t0)

            t1 = time.monotonic()
            noise = torch.randn(16, lat_frames, lat_h, lat_w, generator=generator, dtype=dtype).to(dev)
            sampler = self.sampler_factory()
            sampler.reset()
            apg = APGState() if self.use_apg else None
            if self.step_cache is not None:
                self.step_cache.start_chunk()
            latent = noise
            calls_before = self.stats.model_calls
            steps = sampler.num_steps
            for i in range(steps):
                if should_stop is not None and should_stop():
                    raise CancelledError(f"cancelled at chunk {k + 1}/{plan.num_chunks}, step {i + 1}/{steps}")
                latent[:, :n_motion] = motion
                t = sampler.timesteps[i]
                preds = {}
                for name in self.passes:
                    context, pass_audio = inputs[name]
                    pass_masks = masks if pass_audio.shape[0] == 2 else None
                    preds[name] = self._model_call(latent, t, context, clip_tokens, y, pass_audio, pass_masks,
                                                   name, i, steps, k)
                latent = sampler.step(combine(preds, self.text_scale, self.audio_scale, apg), i, latent)
                latent[:, :n_motion] = motion
                if progress is not None:
                    elapsed = time.monotonic() - started
                    done = (k - start_chunk) * steps + i + 1
                    total = (plan.num_chunks - start_chunk) * steps
                    progress({"chunk": k + 1, "chunks": plan.num_chunks, "step": i + 1, "steps": steps,
                              "passes": len(self.passes), "elapsed_s": elapsed,
                              "cache_skips": self.step_cache.skipped_this_chunk if self.step_cache else 0,
                              "eta_s": elapsed / done * (total - done)})
            self.stats.calls_per_chunk.append(self.stats.model_calls - calls_before)
            self.stats.cache_skips_per_chunk.append(self.step_cache.skipped_this_chunk if self.step_cache else 0)
            self.stats.seconds["denoise"] += self._elapsed(t1)

            t2 = time.monotonic()
            video = self.vae.decode(latent[None])[0].float()  # [3, 81, H, W] in [-1, 1]
            if self.color_correct is not None and cond.color_reference is not None and cond.color_strength > 0:
                video = self.color_correct(video[None], cond.color_reference, cond.color_strength)[0]
            context_frames = video[:, -plan.motion_frames:][None]
            self.stats.seconds["decode"] += self._elapsed(t2)
            on_frames(k, video[:, plan.new_frames(k)].cpu())
            self.stats.chunks_done += 1
        return context_frames
