"""Every transformer load option on this machine at the real 14B shape (random weights): what the planner resolves it
to, and — when it runs — seconds per 480p forward, peak memory and the output's distance to the default plan's.
Then bf16/fp8 parity against float32 math on the first blocks at the full 480p token count.

    python benchmarks/option_matrix.py --out matrix.json            # GPU
    python benchmarks/option_matrix.py --config tiny --device cpu   # smoke test

Refused values print the planner's one-line reason (the same text `generate` exits with). Values that resolve but
do not fit this card's memory are reported as such (e.g. fp32 weights of the 14B model need 75 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics

import torch

from dit_forward import build_model, grid, make_inputs, timed
from infinite_talk.errors import OptionError
from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.options import LoadOptions
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import probe

FIELDS = ("model_precision", "quantization", "attention")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def run_plan(plan, cfg, device, shape, layers=None, iters=2):
    model = build_model(cfg, device, plan.torch_dtype, plan.attention_backend, plan.quantization, layers=layers)
    inputs = make_inputs(cfg, device, *shape)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model(**inputs)
        seconds = statistics.median(timed(lambda: model(**inputs), device, iters))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out.float().cpu(), seconds, peak


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parity-layers", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = GEOMETRIES[args.config].dit
    shape = grid(args.config, args.size)
    caps = probe()
    rows = []
    default = resolve(LoadOptions(device=args.device), caps)
    baseline, seconds, peak = run_plan(default, cfg, device, shape)
    free(device)
    measured = {(default.model_dtype, default.quantization, default.attention_kernel): (baseline, seconds, peak)}
    for field in FIELDS:
        for value in next(f for f in dataclasses.fields(LoadOptions) if f.name == field).metadata["choices"]:
            options = LoadOptions(**{field: value}, device=args.device)
            row = {"option": f"{field}={value}"}
            try:
                plan = resolve(options, caps)
            except OptionError as err:
                rows.append({**row, "outcome": "refused", "reason": str(err)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            resolved = plan.options[field]
            row.update(effective=resolved.effective, reason=resolved.reason, kernel=plan.attention_kernel,
                       quantization=plan.quantization, dtype=plan.model_dtype)
            key = (plan.model_dtype, plan.quantization, plan.attention_kernel)
            try:
                if key not in measured:  # the same plan reached by another option value runs once
                    measured[key] = run_plan(plan, cfg, device, shape, iters=1)
                out, seconds, peak = measured[key]
            except torch.OutOfMemoryError as err:
                row.update(outcome="out of memory", error=str(err).split("\n")[0][:200])
            else:
                row.update(outcome="ran", seconds_per_forward=round(seconds, 3),
                           peak_gib=None if peak is None else round(peak, 2), rel_l2_vs_default=round(
                               rel_l2(out, baseline), 5))
            free(device)
            measured = {k: v for k, v in measured.items() if k == key or v[0] is baseline}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # written as it goes: a run cut short still reports what it measured
                with open(args.out, "w") as fh:
                    json.dump({"rows": rows}, fh, indent=2)

    # Parity: the first N blocks at the full token count, float32 math vs what the fast plans run.
    parity = []
    layers = min(args.parity_layers, cfg.num_layers)
    reference_plan = resolve(LoadOptions(model_precision="fp32", attention="sdpa", device=args.device), caps)
    reference, _, _ = run_plan(reference_plan, cfg, device, shape, layers=layers, iters=1)
    free(device)
    for label, opts in [("bf16 auto", {}), ("bf16 sdpa", {"attention": "sdpa"}),
                        ("fp8 auto", {"quantization": "fp8"}), ("int8 auto", {"quantization": "int8"})]:
        try:
            plan = resolve(LoadOptions(device=args.device, **opts), caps)
        except OptionError as err:
            parity.append({"plan": label, "refused": str(err)})
            continue
        out, _, _ = run_plan(plan, cfg, device, shape, layers=layers, iters=1)
        free(device)
        parity.append({"plan": label, "kernel": plan.attention_kernel, "quantization": plan.quantization,
                       "layers": layers, "rel_l2_vs_fp32": round(rel_l2(out, reference), 5)})
        print(json.dumps(parity[-1]), flush=True)

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "config": args.config, "size": args.size, "machine": caps.summary(), "torch": torch.__version__,
              "rows": rows, "parity": parity}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
