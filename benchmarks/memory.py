"""One 480p chunk of the 14B transformer (random weights) under GPU memory budgets: peak memory, seconds per model
call, the slowdown against the unconstrained run in the same process, and the memory plan's estimate against the
measured peak.

    python benchmarks/memory.py --out memory.json                          # GPU: bf16, fp8, int8 x 24/16/12 GiB
    python benchmarks/memory.py --modes int8,nf4 --budgets 12 --steps 3    # a subset
    python benchmarks/memory.py --config tiny --device cpu                 # smoke test (seconds), no budgets

Per precision mode: the model is built once (benchmarks/dit_forward.py `build_model`, quantized on the GPU), run
with every weight on the GPU, then for each budget the memory plan (`plan/memory.py`, `auto`) picks the offload and
VAE tiling for `budget - context` GiB of free memory (`--context-gib`: what the CUDA context takes on a real card of
that size), `torch.cuda.set_per_process_memory_fraction` caps the allocator there, and the same inputs run again.
Each run: one warm-up model call, `--steps` timed ones (CUDA events), then the chunk's VAE decode and encode
(random-weight Wan VAE, kept on the GPU). The output is compared with the unconstrained run's (a swapped block read
before its copy finished would differ). Encoders are not loaded: their phases are not measured, and the estimates
compared are the transformer and VAE phases with the encoders off the GPU.

On the CPU (`--device cpu`) nothing can be capped: the budgets are replaced by fractions of the unconstrained
estimate, the offload hooks run with host memory on both sides, and the measured peak is the tensor bytes traced on
the real tensors (`plan.memory.trace_peak`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.models.offload import (
    apply_block_swap,
    apply_offload,
    apply_sequential,
    move_module,
    remove_offload,
)
from infinite_talk.models.placement import Offload
from infinite_talk.plan.memory import GIB, MemoryModel, Setting, Shape, copy_notes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_forward import build_model, grid, make_inputs, timed  # noqa: E402  (the same random model and inputs)

MODES = {"bf16": "disabled", "fp8": "fp8", "int8": "int8-weight-only", "nf4": "nf4"}


def quantization_mode(name: str, device: torch.device) -> str:
    """bf16/fp8/int8/nf4 -> the mode the planner would pick here (fp8 GEMMs need sm >= 8.9)."""
    mode = MODES.get(name, name)
    if mode == "fp8":
        fast = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
        return "fp8-compute" if fast else "fp8-storage"
    return mode


def random_vae(geometry, device, dtype):
    from infinite_talk.models.vae import WanVae
    from infinite_talk.plan.memory import wan_vae_model

    model = wan_vae_model(geometry).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.data = torch.empty(p.shape, device=device).normal_(0.0, 0.02, generator=g).to(dtype)
    return WanVae(model.eval())


def h2d_rate(device) -> float | None:
    """Pinned host -> GPU copy rate in GB/s (1 GiB)."""
    if device.type != "cuda":
        return None
    src = torch.empty(GIB, dtype=torch.uint8).pin_memory()
    seconds = statistics.median(timed(lambda: src.to(device, non_blocking=True), device, 5))
    return round(GIB / seconds / 1e9, 1)


class Peak:
    """Peak bytes of a block of work: CUDA allocator statistics, or on the CPU the traced tensor bytes."""

    def __init__(self, device):
        self.device = device

    def run(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            return out, torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        from infinite_talk.plan.memory import trace_peak

        peak, out = trace_peak(fn)  # tensors created by `fn` only: the weights are not in it
        return out, peak, None


def place(model, setting: Setting, device, cpu_smoke: bool) -> dict:
    remove_offload(model)
    if cpu_smoke:  # hooks with host memory on both sides
        placement = Offload.parse(setting.offload, len(model.blocks))
        if placement.kind == "blocks":
            return apply_block_swap(model, placement.blocks, "cpu", use_stream=False, prefetch=True)
        if placement.kind == "sequential":
            return apply_sequential(model, "cpu", use_stream=False)
        return {"offload": "none"}
    # as the pipeline loads an offloaded model: from host memory, so the resident blocks are allocated afresh (placing
    # it from the previous setting's GPU layout leaves block-sized holes that 640 MB activations cannot use)
    move_module(model, "cpu")
    gc.collect()
    torch.cuda.empty_cache()
    if setting.offload == "none":
        move_module(model, device)
        return {"offload": "none"}
    placement = Offload.parse(setting.offload, len(model.blocks))
    if placement.kind == "blocks":  # each block in its own form (this benchmark quantizes some models, not others)
        return apply_block_swap(model, placement.blocks, device)
    return apply_offload(model, placement, device)


def measure(model, vae, inputs, setting, steps, device, reference=None, with_vae: bool = True) -> dict:
    peak = Peak(device)
    vae.enable_tiling() if setting.vae_tiling else vae.disable_tiling()
    with torch.inference_mode():
        first = timed(lambda: model(**inputs), device, 1)[0]

        def forward():
            return model(**inputs)

        out, t_alloc, t_reserved = peak.run(forward)
        runs = timed(forward, device, steps)
        frames, lat_h, lat_w = inputs["hidden_states"].shape[2:]
        latent = torch.randn(1, 16, frames, lat_h, lat_w, device=device)
        keyframe = torch.rand(1, 3, 1, lat_h * 8, lat_w * 8, device=device) * 2 - 1

        def encode():  # as the chunk loop builds the reference latent's input: keyframe + zeros, fp32
            zeros = torch.zeros(1, 3, 4 * (frames - 1), lat_h * 8, lat_w * 8, device=device)
            return vae.encode(torch.cat([keyframe, zeros], dim=2))

        start = time.perf_counter()
        _, d_alloc, d_reserved = peak.run(lambda: vae.decode(latent)) if with_vae else (None, 0, 0)
        _, e_alloc, e_reserved = peak.run(encode) if with_vae else (None, 0, 0)
        vae_s = time.perf_counter() - start
    result = {
        "setting": dataclasses.asdict(setting), "first_call_s": round(first, 3),
        "seconds_per_model_call": round(statistics.median(runs), 4), "runs_s": [round(r, 4) for r in runs],
        "vae_decode_encode_s": round(vae_s, 3),
        "measured_gib": {"transformer": round(t_alloc / GIB, 4), "VAE": round(max(d_alloc, e_alloc) / GIB, 4)},
    }
    if t_reserved is not None:
        result["reserved_gib"] = {"transformer": round(t_reserved / GIB, 3),
                                  "VAE": round(max(d_reserved, e_reserved) / GIB, 3)}
    if reference is not None:
        result["max_abs_diff_vs_unconstrained"] = float((out.float() - reference.float()).abs().max())
    return result, out


def compare(result: dict, estimate, device) -> None:
    est = {k: estimate.phases[k] for k in ("transformer", "VAE")}
    result["estimated_gib"] = {k: round(v / GIB, 4) for k, v in est.items()}
    measured = result["measured_gib"]
    if device.type != "cuda":  # the CPU trace holds no weights: compare the transients only
        weights = sum(estimate.resident.values())
        est = {k: v - weights for k, v in est.items()}
        result["estimated_transients_gib"] = {k: round(v / GIB, 4) for k, v in est.items()}
    result["estimate_error"] = {k: round(est[k] / GIB / measured[k] - 1, 3) if measured[k] else None for k in est}


def run_mode(name: str, args, device, geometry, shape, inputs, vae) -> dict:
    cfg = geometry.dit
    mode = quantization_mode(name, device)
    cpu_smoke = device.type != "cuda"
    try:
        model = build_model(cfg, device, torch.bfloat16, args.attention, mode)
    except Exception as err:  # e.g. torchao missing or a kernel this GPU lacks
        return {"mode": name, "quantization": mode, "unavailable": f"{type(err).__name__}: {err}"[:300]}
    planner = MemoryModel(geometry, "bfloat16", "bfloat16", mode, attention_backend=args.attention)
    out = {"mode": name, "quantization": mode, "runs": []}
    base_setting = Setting("none", False, True)  # no encoders in this benchmark
    base, reference = measure(model, vae, inputs, base_setting, args.steps, device)
    compare(base, planner.estimate(base_setting, shape), device)
    base["budget_gib"] = None
    out["runs"].append(base)
    sm = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if cpu_smoke:  # nothing to cap: run each kind of setting once
        layers = len(model.blocks)
        kinds = ("blocks:1", f"blocks:{layers}") + (("sequential",) if mode == "disabled" else ())  # QUANTIZED_OFFLOAD
        plans = [(None, Setting(s, True, True)) for s in kinds]
    else:
        plans = []
        for budget in args.budgets:
            est, fits = planner.choose((budget - args.context_gib) * GIB, shape)
            plans.append((budget, dataclasses.replace(est.setting, encoders_offloaded=True)))
    for budget, setting in plans:
        free = None if budget is None else (budget - args.context_gib) * GIB
        est = planner.estimate(setting, shape)
        run = {"budget_gib": budget, "free_for_allocator_gib": None if free is None else round(free / GIB, 3),
               "plan_fits": None if free is None else est.fits(free), "notes": copy_notes(planner, est, shape, sm)}
        try:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            report = place(model, setting, device, cpu_smoke)
            gc.collect()
            if free is not None:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(free / torch.cuda.get_device_properties(device).total_memory,
                                                           device)
            # (the CPU smoke test decodes once per mode: the VAE does not depend on the transformer's offload)
            result, _ = measure(model, vae, inputs, setting, args.steps, device, reference,
                                with_vae=not cpu_smoke or budget is plans[0][0] and setting is plans[0][1])
            result["offload_report"] = {k: v for k, v in report.items() if k != "swapped_blocks"}
            compare(result, planner.estimate(setting, shape), device)
            result["slowdown"] = round(result["seconds_per_model_call"] / base["seconds_per_model_call"], 3)
            run.update(result)
        except torch.OutOfMemoryError as err:
            run.update({"setting": dataclasses.asdict(setting), "oom": str(err).splitlines()[0][:300]})
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        out["runs"].append(run)
        print(json.dumps({k: run.get(k) for k in ("budget_gib", "setting", "seconds_per_model_call", "slowdown",
                                                   "measured_gib", "estimated_gib", "oom")}), flush=True)
    remove_offload(model)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(modes: list[dict]) -> list[str]:
    """One line per run: mode, budget, setting, s/model call, slowdown, peak measured vs estimated (worst phase)."""
    lines = ["mode | budget GiB | setting | s/call | slowdown | peak GiB measured | estimated | error"]
    for mode in modes:
        for run in mode.get("runs", []):
            budget = run.get("budget_gib")
            setting = run.get("setting", {})
            name = setting.get("offload", "?") + (" +tiling" if setting.get("vae_tiling") else "")
            if "oom" in run:
                lines.append(f"{mode['mode']} | {budget} | {name} | OOM | | | |")
                continue
            measured, est = run.get("measured_gib", {}), run.get("estimated_gib", {})
            phase = max(measured, key=measured.get) if measured else None
            err = run.get("estimate_error", {}).get(phase)
            lines.append(f"{mode['mode']} ({mode['quantization']}) | {budget or 'none'} | {name} | "
                         f"{run.get('seconds_per_model_call')} | {run.get('slowdown', 1.0)} | "
                         f"{measured.get(phase)} ({phase}) | {est.get(phase)} | {err}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, choices=(480, 720), default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="bf16,fp8,int8", help="comma list of bf16, fp8, int8, nf4 (or plan modes)")
    parser.add_argument("--budgets", default="24,16,12", help="GPU memory budgets in GiB (card sizes)")
    parser.add_argument("--context-gib", type=float, default=0.75,
                        help="taken off each budget for the CUDA context a real card of that size holds")
    parser.add_argument("--attention", default=None, help="diffusers attention backend (default: _native_cudnn on "
                        "CUDA, native on CPU)")
    parser.add_argument("--steps", type=int, default=2, help="timed model calls per setting")
    parser.add_argument("--passes", type=int, default=1, help="model calls per step, for seconds_per_step")
    parser.add_argument("--expandable-segments", action="store_true",
                        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation)")
    parser.add_argument("--out", help="JSON file, rewritten after each mode")
    args = parser.parse_args()

    if args.expandable_segments:  # read when CUDA's allocator starts, which has not happened yet
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the allocator cap needs an explicit index
        device = torch.device("cuda", torch.cuda.current_device())
    args.attention = args.attention or ("_native_cudnn" if device.type == "cuda" else "native")
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    geometry = GEOMETRIES[args.config]
    frames, lat_h, lat_w = grid(args.config, args.size)
    shape = Shape(lat_h * 8, lat_w * 8, 4 * (frames - 1) + 1, 1)
    inputs = make_inputs(geometry.dit, device, frames, lat_h, lat_w)
    vae = random_vae(geometry, device, torch.bfloat16)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "total_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / GIB, 2)
        if device.type == "cuda" else None,
        "h2d_pinned_gb_per_s": h2d_rate(device), "config": args.config, "shape": dataclasses.asdict(shape),
        "tokens": shape.tokens, "attention": args.attention, "context_gib": args.context_gib,
        "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "modes": [],
    }
    for name in [m for m in args.modes.split(",") if m]:
        mode = run_mode(name, args, device, geometry, shape, inputs, vae)
        for run in mode.get("runs", []):
            if "seconds_per_model_call" in run:
                run["seconds_per_step"] = round(run["seconds_per_model_call"] * args.passes, 4)
        result["modes"].append(mode)
        result["table"] = table(result["modes"])
        if args.out:  # partial results survive a time limit
            Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
