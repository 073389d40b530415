"""Seconds for one full 81-frame chunk — every step and guidance pass, CLIP, VAE encode and decode — through the
product's own `ChunkLoop`, at the real shapes with random weights (speed does not depend on the weight values).

    python benchmarks/chunk.py --steps 4 --text-scale 1 --audio-scale 1 --quantization fp8-compute \
        --attention fa3_fwd --compile --out chunk_fast.json                       # fast mode, GPU
    python benchmarks/chunk.py --steps 2 --out chunk_default_2steps.json          # default passes, 2 of 40 steps
    python benchmarks/chunk.py --config tiny --device cpu                         # smoke test

Reports per stage (encode = CLIP + VAE encodes, denoise, decode), model calls, seconds per model call, the bf16
matmul rate measured in the same run, the real-time factor (chunk seconds / seconds of new video) and the device.
The second chunk is the one timed (the first pays for compilation and the reference-latent cache fill).
"""

from __future__ import annotations

import argparse
import time

import torch

from dit_forward import build_model, device_name, grid, matmul_rate, peak_gib, report
from infinite_talk.models.compilation import compile_blocks
from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.models.vae import WanVae
from infinite_talk.sampling.guidance import passes_for
from infinite_talk.sampling.loop import ChunkLoop, Conditioning
from infinite_talk.sampling.schedules import make_sampler
from infinite_talk.sampling.windows import FPS, plan_chunks


def random_vae(geometry, device, dtype) -> WanVae:
    from diffusers import AutoencoderKLWan

    g = geometry.vae
    with torch.device(device):
        model = AutoencoderKLWan(base_dim=g.dim, z_dim=g.z_dim, dim_mult=list(g.dim_mult),
                                 num_res_blocks=g.num_res_blocks, attn_scales=[],
                                 temperal_downsample=list(g.temperal_downsample), dropout=0.0)
    return WanVae(model.to(dtype).eval().requires_grad_(False))  # as load_vae leaves it: all in the VAE dtype


class RandomClip:
    """CLIP's output shape and cost: a ViT-H/14 tower with random weights (257 tokens x 1280)."""

    def __init__(self, geometry, device, dtype):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from infinite_talk.models.image_encoder import ImageEncoder

        g = geometry.clip
        config = CLIPVisionConfig(hidden_size=g.dim, intermediate_size=int(g.dim * g.mlp_ratio),
                                  num_hidden_layers=g.num_layers, num_attention_heads=g.num_heads,
                                  image_size=g.image_size, patch_size=g.patch_size, hidden_act="gelu")
        with torch.device(device):
            model = CLIPVisionModel(config).to(dtype).eval().requires_grad_(False)
        self.encoder = ImageEncoder(model, g.image_size)

    def encode(self, image):
        return self.encoder.encode(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--text-scale", type=float, default=5.0)
    parser.add_argument("--audio-scale", type=float, default=4.0)
    parser.add_argument("--attention", default="native")
    parser.add_argument("--quantization", default="disabled")
    parser.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune the VAE's 3-D convolutions")
    parser.add_argument("--out")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    geometry = GEOMETRIES[args.config]
    cfg = geometry.dit
    frames, lat_h, lat_w = grid(args.config, args.size)
    height, width = lat_h * 8, lat_w * 8
    frame_num = 4 * (frames - 1) + 1
    model = build_model(cfg, device, torch.bfloat16, args.attention, args.quantization)
    if args.compile:
        compile_blocks(model)
    vae = random_vae(geometry, device, torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32)
    if device.type == "cuda":
        vae.use_channels_last()  # as load_vae does
        vae.use_fused_kernels()
    clip = RandomClip(geometry, device, torch.float16 if device.type == "cuda" else torch.float32)

    g = torch.Generator().manual_seed(0)
    motion = 9 if frame_num > 9 else 5  # the tiny smoke grid has 9-frame chunks
    plan = plan_chunks(2 * frame_num - motion, None, frame_num, motion)  # two chunks: the second is timed
    keyframe = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
    cond = Conditioning(
        prompt_context=torch.randn(40, cfg.text_dim, generator=g), negative_context=torch.randn(60, cfg.text_dim,
                                                                                                generator=g),
        audio_embeddings=[torch.randn(plan.audio_lens[0], cfg.audio_layers, cfg.audio_dim, generator=g)],
        person_masks=torch.ones(3, lat_h // 2, lat_w // 2), keyframe=lambda k: ("image", keyframe),
        color_reference=None,
    )
    loop = ChunkLoop(model, vae, clip, lambda: make_sampler(args.scheduler, args.steps, 7.0),
                     text_scale=args.text_scale, audio_scale=args.audio_scale, device=device)
    marks = []

    def on_frames(k, video):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), dict(loop.stats.seconds), loop.stats.model_calls, video.shape[1]))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        loop.run(plan, cond, torch.Generator().manual_seed(0), on_frames=on_frames)
    (t0, s0, c0, _), (t1, s1, c1, new_frames) = marks
    chunk_s = t1 - t0
    stages = {k: round(s1[k] - s0[k], 3) for k in s1}
    rate = matmul_rate(device, torch.bfloat16)
    result = {
        "device": device_name(device),
        "config": args.config, "size": [width, height], "frame_num": frame_num, "steps": args.steps,
        "passes_per_step": len(passes_for(args.text_scale, args.audio_scale)), "scheduler": args.scheduler,
        "attention": args.attention, "quantization": args.quantization, "compile": args.compile,
        "vae_dtype": args.vae_dtype, "cudnn_benchmark": args.cudnn_benchmark,
        "vae_channels_last": device.type == "cuda",
        "first_chunk_s": round(t0 - start, 3), "chunk_s": round(chunk_s, 3), "stages_s": stages,
        "model_calls": c1 - c0, "seconds_per_model_call": round(stages["denoise"] / max(1, c1 - c0), 4),
        "new_frames": new_frames, "video_seconds": new_frames / FPS,
        "real_time_factor": round(chunk_s / (new_frames / FPS), 3),
        "matmul_tflops_bf16": round(rate, 1), "peak_memory_gib": peak_gib(device), "torch": torch.__version__,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
