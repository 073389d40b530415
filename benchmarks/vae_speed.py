"""Wan VAE decode/encode of one 81-frame 480p chunk (random weights) under layout/compile variants, in one process.

    python benchmarks/vae_speed.py --out vae.json                       # GPU
    python benchmarks/vae_speed.py --config tiny --device cpu --variants eager,channels_last   # smoke test

Variants: `eager` (as loaded), `cudnn_benchmark` (cuDNN autotuning of the 3-D convolutions), `channels_last`
(Conv3d weights in channels_last_3d, so convolutions run NDHWC), `compile` (torch.compile of each decoder residual
block), `fused` (`WanVae.use_fused_kernels`: fused RMS-norm + SiLU, spatial padding inside the convolutions),
`stepsN` (N latent frames per causal decoder/encoder call; with `fused`), `fp32` (the VAE in float32: put it first
to measure every variant's error against float32). Each reports the median decode and encode
seconds, the peak memory, and the decode's and encode's max and relative L2 difference from the first variant.
"""

from __future__ import annotations

import argparse
import statistics
from chunk import random_vae

import torch

from dit_forward import device_name, grid, peak_gib, report, timed
from infinite_talk.models.configs import GEOMETRIES


def compile_decoder(vae) -> None:
    for module in vae.model.decoder.modules():
        if type(module).__name__ in ("WanResidualBlock", "WanAttentionBlock"):
            module.compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="eager,cudnn_benchmark,channels_last,channels_last+cudnn_benchmark,"
                                              "compile")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", default="",
                        help="comma-separated variants to profile one decode of: the top operators by device time")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    geometry = GEOMETRIES[args.config]
    frames, lat_h, lat_w = grid(args.config, args.size)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, frames, lat_h, lat_w, generator=g).to(device)
    video = (torch.rand(1, 3, 4 * (frames - 1) + 1, lat_h * 8, lat_w * 8, generator=g) * 2 - 1).to(device)
    rows, reference, profiles = [], None, {}
    for variant in args.variants.split(","):
        parts = set(variant.split("+"))
        steps = next((int(p[5:]) for p in parts if p.startswith("steps")), 1)
        torch.backends.cudnn.benchmark = "cudnn_benchmark" in parts
        torch.manual_seed(0)  # the same random weights for every variant
        vae = random_vae(geometry, device, torch.float32 if "fp32" in parts else torch.bfloat16)
        if "channels_last" in parts:
            vae.use_channels_last()
        if "fused" in parts or steps > 1:
            vae.use_fused_kernels(steps)
        if "compile" in parts:
            compile_decoder(vae)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            first = timed(lambda vae=vae: vae.decode(latent), device, 1)[0]
            out = vae.decode(latent).float()
            enc = vae.encode(video).float()
            decode = statistics.median(timed(lambda vae=vae: vae.decode(latent), device, args.iters))
            encode = statistics.median(timed(lambda vae=vae: vae.encode(video), device, args.iters))
        if variant in args.profile.split(","):
            profiles[variant] = profile_decode(vae, latent, device)
        reference = (out, enc) if reference is None else reference
        rows.append({"variant": variant, "first_decode_s": round(first, 3), "decode_s": round(decode, 4),
                     "encode_s": round(encode, 4), "peak_gib": peak_gib(device),
                     "decode_max_abs_diff_vs_first": float((out - reference[0]).abs().max()),
                     "decode_rel_l2_vs_first": float((out - reference[0]).norm() / reference[0].norm()),
                     "encode_max_abs_diff_vs_first": float((enc - reference[1]).abs().max()),
                     "encode_rel_l2_vs_first": float((enc - reference[1]).norm() / reference[1].norm())})
        print(rows[-1], flush=True)
        del vae
    result = {"device": device_name(device), "config": args.config, "latent": list(latent.shape),
              "torch": torch.__version__, "rows": rows}
    if profiles:
        result["profiles"] = profiles
    report(result, args.out)


def profile_decode(vae, latent, device, top: int = 15) -> dict:
    """One decode under torch.profiler: total device time, kernel launches, and the top operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        vae.decode(latent)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def dev_us(e):
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or e.self_cpu_time_total
    rows = sorted(events, key=dev_us, reverse=True)[:top]
    on_device = [e for e in events if "cuda" in str(e.device_type).lower()]  # kernel and copy events
    return {"device_ms_total": round(sum(dev_us(e) for e in on_device) / 1e3, 1),
            "device_kernels": sum(e.count for e in on_device),
            "top": [{"op": e.key[:80], "calls": e.count, "self_device_ms": round(dev_us(e) / 1e3, 2),
                     "cpu_ms": round(e.cpu_time_total / 1e3, 2)} for e in rows]}


if __name__ == "__main__":
    main()
