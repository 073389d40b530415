"""Seconds per InfiniteTalk transformer forward at the real shapes, with random weights, against the card's matmul rate.

    python benchmarks/dit_forward.py --config 14b --size 480 --out dit.json      # GPU
    python benchmarks/dit_forward.py --config tiny --device cpu                  # smoke test, seconds

Reports the median of warm runs (CUDA events on GPU), achieved TFLOP/s from the FLOP count, the bf16 matmul rate
measured in the same process (8192^3), their ratio, peak memory and the device name. Speed does not depend on the
weight values, so the weights are random (no checkpoint needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import init_empty_weights

from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.models.transformer_loading import keeps_fp32

LATENT_GRIDS = {480: (21, 60, 104), 720: (21, 90, 160)}  # 832x480 / 1280x720 at 81 frames


def forward_flops(cfg, frames: int, lat_h: int, lat_w: int, context: int) -> float:
    tokens = frames * (lat_h // 2) * (lat_w // 2)
    d, f = cfg.dim, cfg.ffn_dim
    per_block = (
        8 * tokens * d * d  # self-attention q, k, v, o
        + 4 * tokens * tokens * d  # self-attention scores and values
        + 4 * tokens * d * d + 4 * context * d * d + 4 * tokens * context * d  # text+image cross-attention
        + 4 * tokens * d * d  # audio cross-attention q and proj (the audio keys are few)
        + 4 * tokens * d * f  # FFN
    )
    return cfg.num_layers * per_block


def timed(fn, device, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def matmul_rate(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, device, 3)
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device, 10)) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, choices=sorted(LATENT_GRIDS), default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--attention", default="native", help="diffusers attention backend name")
    parser.add_argument("--speakers", type=int, choices=[1, 2], default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    geometry = GEOMETRIES[args.config]
    cfg = geometry.dit
    frames, lat_h, lat_w = LATENT_GRIDS[args.size] if args.config == "14b" else (3, 8, 8)
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02 if p.ndim > 1 else 0.1)
        model.rope.__init__(cfg.head_dim, (1, 2, 2), cfg.rope_max_seq_len)  # buffers were left empty
        model.rope.to(device)
    for name, p in model.named_parameters():  # as the loader does: time MLPs, modulation, norms, head stay fp32
        if not keeps_fp32(name):
            p.data = p.data.to(dtype)
    model.set_attention_backend(args.attention)
    model.eval().requires_grad_(False)

    g = torch.Generator(device="cpu").manual_seed(0)
    video_frames = 4 * (frames - 1) + 1
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, lat_h, lat_w, generator=g).to(device),
        timestep=torch.tensor([900.0], device=device),
        encoder_hidden_states=torch.randn(1, 40, cfg.text_dim, generator=g).to(device),
        encoder_hidden_states_image=torch.randn(1, 257, cfg.image_dim, generator=g).to(device),
        condition=torch.randn(1, 20, frames, lat_h, lat_w, generator=g).to(device),
        audio=torch.randn(args.speakers, video_frames, 5, cfg.audio_layers, cfg.audio_dim, generator=g).to(device),
        ref_target_masks=torch.ones(3, lat_h, lat_w, device=device),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first = timed(lambda: model(**inputs), device, 1)[0]
        runs = timed(lambda: model(**inputs), device, args.iters)
    seconds = statistics.median(runs)
    flops = forward_flops(cfg, frames, lat_h, lat_w, 257 + cfg.text_len)
    rate = matmul_rate(device, dtype)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": args.config, "size": args.size, "dtype": args.dtype, "attention": args.attention,
        "speakers": args.speakers, "tokens": frames * (lat_h // 2) * (lat_w // 2),
        "first_call_s": round(first, 4), "runs_s": [round(r, 4) for r in runs], "seconds_per_forward": round(seconds, 4),
        "pflop": round(flops / 1e15, 4), "achieved_tflops": round(flops / seconds / 1e12, 1),
        "matmul_tflops": round(rate, 1), "ratio_to_matmul": round(flops / seconds / 1e12 / rate, 3),
        "floor_s_at_matmul_rate": round(flops / (rate * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
