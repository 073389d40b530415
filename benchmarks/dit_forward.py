"""Seconds per InfiniteTalk transformer forward at the real shapes, with random weights, against the card's matmul rate.

    python benchmarks/dit_forward.py --config 14b --size 480 --out dit.json      # GPU
    python benchmarks/dit_forward.py --quantization fp8-compute --attention fa3_fwd  # fp8 GEMMs + FA3
    python benchmarks/dit_forward.py --config tiny --device cpu                  # smoke test, seconds

Reports the median of warm runs (CUDA events on GPU), achieved TFLOP/s from the FLOP count, the bf16 matmul rate
measured in the same process (8192^3), their ratio, peak memory and the device name. Speed does not depend on the
weight values, so the weights are random (no checkpoint needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from infinite_talk.models.compilation import compile_blocks
from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.models.quantize import quantize_transformer
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


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def report(result: dict, out: str | None) -> None:
    """Print the result and write it as JSON to `out` (when given)."""
    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)


def fp8_matmul_rate(device) -> float | None:
    """torch._scaled_mm e4m3 x e4m3 -> bf16 at 8192^3 (None where there are no fp8 GEMMs)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)

    def mm():
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    timed(mm, device, 3)
    return 2 * n**3 / statistics.median(timed(mm, device, 10)) / 1e12


def build_model(cfg, device, dtype, attention: str = "native", quantization: str = "disabled",
                layers: int | None = None, seed: int = 0) -> InfiniteTalkTransformer:
    """The transformer with random weights (same for the same seed), as the loader leaves it: time MLPs, modulation,
    norms and head in fp32, the rest in `dtype`, then quantized and given its attention backend."""
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # drawn in fp32 one tensor at a time, then cast: same values for every dtype, low peak
        for name, p in list(model.named_parameters()):
            value = torch.empty(p.shape, device=device).normal_(0.0, 0.02 if p.ndim > 1 else 0.1, generator=gen)
            target = torch.float32 if keeps_fp32(name) else dtype
            set_module_tensor_to_device(model, name, device, value=value.to(target), dtype=target)
        model.rope.__init__(cfg.head_dim, (1, 2, 2), cfg.rope_max_seq_len)  # buffers were left empty
        model.rope.to(device)
    quantize_transformer(model, quantization, device)
    model.set_attention_backend(attention)
    return model.eval().requires_grad_(False)


def make_inputs(cfg, device, frames: int, lat_h: int, lat_w: int, speakers: int = 1, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    video_frames = 4 * (frames - 1) + 1
    return dict(
        hidden_states=torch.randn(1, 16, frames, lat_h, lat_w, generator=g).to(device),
        timestep=torch.tensor([900.0], device=device),
        encoder_hidden_states=torch.randn(1, 40, cfg.text_dim, generator=g).to(device),
        encoder_hidden_states_image=torch.randn(1, 257, cfg.image_dim, generator=g).to(device),
        condition=torch.randn(1, 20, frames, lat_h, lat_w, generator=g).to(device),
        audio=torch.randn(speakers, video_frames, 5, cfg.audio_layers, cfg.audio_dim, generator=g).to(device),
        ref_target_masks=torch.ones(3, lat_h, lat_w, device=device),
    )


def grid(config: str, size: int) -> tuple[int, int, int]:
    return LATENT_GRIDS[size] if config == "14b" else (3, 8, 8)


def model_arguments(parser: argparse.ArgumentParser, attention_default: str | None, attention_help: str) -> None:
    """The flags that choose the model and its shape, shared by the transformer benchmarks."""
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, choices=sorted(LATENT_GRIDS), default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--attention", default=attention_default, help=attention_help)
    parser.add_argument("--quantization", default="disabled",
                        choices=["disabled", "fp8-compute", "fp8-storage", "int8-weight-only", "nf4"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser, "native", "diffusers attention backend name, or one of ours (fa3_fwd, sageattn3)")
    parser.add_argument("--speakers", type=int, choices=[1, 2], default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--parity-layers", type=int, default=0,
                        help="also compare the first N blocks of this configuration with float32 math (rel-L2)")
    parser.add_argument("--compare-attention", default="",
                        help="comma list of other attention backends: time the same model's forward with each and "
                             "report its rel-L2 against this forward (e.g. --attention fa3_fwd --compare-attention "
                             "sage8_triton,_native_cudnn)")
    parser.add_argument("--two-speaker-overhead", action="store_true",
                        help="also time the forward with two speakers (first-frame map + L-RoPE routing)")
    parser.add_argument("--out")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    geometry = GEOMETRIES[args.config]
    cfg = geometry.dit
    frames, lat_h, lat_w = grid(args.config, args.size)
    model = build_model(cfg, device, dtype, args.attention, args.quantization)
    if args.compile:
        compile_blocks(model)
    inputs = make_inputs(cfg, device, frames, lat_h, lat_w, args.speakers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first = timed(lambda: model(**inputs), device, 1)[0]
        runs = timed(lambda: model(**inputs), device, args.iters)
    seconds = statistics.median(runs)
    flops = forward_flops(cfg, frames, lat_h, lat_w, 257 + cfg.text_len)
    rate = matmul_rate(device, dtype)
    fp8_rate = fp8_matmul_rate(device)
    result = {
        "device": device_name(device),
        "config": args.config, "size": args.size, "dtype": args.dtype, "attention": args.attention,
        "quantization": args.quantization, "compile": args.compile,
        "speakers": args.speakers, "tokens": frames * (lat_h // 2) * (lat_w // 2),
        "first_call_s": round(first, 4), "runs_s": [round(r, 4) for r in runs], "seconds_per_forward": round(seconds, 4),
        "pflop": round(flops / 1e15, 4), "achieved_tflops": round(flops / seconds / 1e12, 1),
        "matmul_tflops": round(rate, 1), "ratio_to_matmul": round(flops / seconds / 1e12 / rate, 3),
        "matmul_tflops_fp8": None if fp8_rate is None else round(fp8_rate, 1),
        "floor_s_at_matmul_rate": round(flops / (rate * 1e12), 4),
        "peak_memory_gib": peak_gib(device), "torch": torch.__version__,
    }
    if args.two_speaker_overhead and args.speakers == 1:
        two = make_inputs(cfg, device, frames, lat_h, lat_w, 2)
        two["ref_target_masks"][0, :, : lat_w // 2] = 0  # speaker 1 left, speaker 2 right, background elsewhere
        two["ref_target_masks"][1, :, lat_w // 2:] = 0
        with torch.inference_mode():
            timed(lambda: model(**two), device, 1)
            two_s = statistics.median(timed(lambda: model(**two), device, args.iters))
        result["two_speakers"] = {"seconds_per_forward": round(two_s, 4), "overhead_s": round(two_s - seconds, 4)}
    if args.compare_attention:
        result["compare_attention"] = compare_attention(model, inputs, args, device)
    if args.parity_layers:
        del model
        result["parity"] = parity(cfg, device, dtype, args, inputs)
    report(result, args.out)


def compare_attention(model, inputs, args, device) -> list[dict]:
    """Each of `--compare-attention` in the same model: seconds per forward and rel-L2 against `--attention`."""
    with torch.inference_mode():
        base = model(**inputs).float()
    rows = []
    for name in args.compare_attention.split(","):
        try:
            model.set_attention_backend(name)
            with torch.inference_mode():
                first = timed(lambda: model(**inputs), device, 1)[0]
                seconds = statistics.median(timed(lambda: model(**inputs), device, args.iters))
                out = model(**inputs).float()
        except Exception as err:  # a kernel this machine lacks
            rows.append({"attention": name, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        rel = float((out - base).norm() / base.norm())
        rows.append({"attention": name, "first_call_s": round(first, 3), "seconds_per_forward": round(seconds, 4),
                     "rel_l2_vs_reference": round(rel, 5), "reference": args.attention})
        print(rows[-1], flush=True)
    model.set_attention_backend(args.attention)
    return rows


def parity(cfg, device, dtype, args, inputs) -> dict:
    """rel-L2 of the first `--parity-layers` blocks (this configuration, eager) against the same random weights in
    float32 with SDPA."""
    layers = args.parity_layers
    outs = {}
    for label, build in (("fp32", (torch.float32, "native", "disabled")),
                         ("this", (dtype, args.attention, args.quantization))):
        model = build_model(cfg, device, *build, layers=layers)
        with torch.inference_mode():
            outs[label] = model(**inputs).float()
        del model
    ref = outs["fp32"]
    return {"layers": layers, "rel_l2_vs_fp32": round(float((outs["this"] - ref).norm() / ref.norm()), 5)}


if __name__ == "__main__":
    main()
