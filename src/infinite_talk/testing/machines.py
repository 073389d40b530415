"""Simulated machines for tests: `simulated(name)` is the `Capabilities` a probe of that machine would give.

The planner, the memory plan and the UI's choice statuses are tested against GPUs this CPU machine does not have.
`python -m infinite_talk.testing.machines NAME` prints the doctor table of one (`--json` for the data).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..plan.doctor import print_report
from ..plan.probe import BLACKWELL_SMS, KERNELS, Capabilities, Kernel, hardware_gate

_TORCH_BUILTIN_CUDA = {"sdpa_math": True, "sdpa_efficient": True, "sdpa_flash": True, "sdpa_cudnn": True,
                       "cpu_bf16": True, "cpu_fp16": True, "triton": True}
_SOFTWARE = {"python_version": "3.12.3", "torch_version": "2.11.0+cu130", "cuda_version": "13.0",
             "cudnn_version": "9.13.0", "driver_version": "580.65.06", "host_ram_gib": 125.8,
             "host_ram_available_gib": 110.0}


# hardware gates of the GPU-only checks (as in plan/probe.py's checks), for the reasons of missing entries
_GATES: dict[str, dict[str, Any]] = {
    "sdpa_efficient": {}, "sdpa_cudnn": {},
    "flash_attn_2": {"what": "a CUDA GPU with sm >= 8.0", "min_sm": (8, 0)},
    "sageattn": {"what": "a CUDA GPU with sm >= 8.0", "min_sm": (8, 0)},
    "sage8_triton": {"what": "a CUDA GPU with sm >= 8.9 (fp8 tensor cores)", "min_sm": (8, 9)},
    "sage8_triton_bf16pv": {"what": "a CUDA GPU with sm >= 8.0", "min_sm": (8, 0)},
    "flash_attn_3": {"what": "a Hopper GPU", "sms": ((9, 0),)},
    "fa3_fwd": {"what": "a Hopper GPU", "sms": ((9, 0),)},
    "sageattn_3": {"what": "a Blackwell GPU", "sms": BLACKWELL_SMS},
    "torchao_nvfp4": {"what": "a Blackwell GPU", "sms": BLACKWELL_SMS},
    "scaled_mm_fp8": {"what": "a CUDA GPU with sm >= 8.9", "min_sm": (8, 9)},
    "torchao_fp8_dynamic": {"what": "a CUDA GPU with sm >= 8.9", "min_sm": (8, 9)},
}
_PACKAGE = {"flash_attn_2": "flash-attn", "flash_attn_3": "flash_attn_3", "fa3_fwd": "fa3-fwd",
            "sageattn": "sageattention", "sageattn_3": "sageattn3", "sage8_triton": "triton",
            "sage8_triton_bf16pv": "triton", "torchao_int8_wo": "torchao",
            "torchao_fp8_dynamic": "torchao", "torchao_nvfp4": "torchao", "torchao_fp8_wo": "torchao",
            "torchao_nf4": "torchao"}


def _sim(name: str, gpu_name: str | None, cc: tuple[int, int] | None, mem: float | None, extra: dict[str, bool],
         **software: Any) -> dict[str, Any]:
    gpus = [] if gpu_name is None else [{"name": gpu_name, "capability": cc, "total_memory_gib": mem,
                                         "free_memory_gib": round(mem - 0.6, 1)}]
    kernels = dict(_TORCH_BUILTIN_CUDA) if gpus else {"sdpa_math": True, "sdpa_flash": True,
                                                       "cpu_bf16": True, "cpu_fp16": True}
    kernels.update(extra)
    base = {**_SOFTWARE, **software}
    if not gpus:
        base.update(cuda_version=None, cudnn_version=None, driver_version=None, torch_version="2.11.0+cpu")
    return {"simulated": name, "gpus": gpus, "kernels": kernels, **base}


SIMULATED: dict[str, dict[str, Any]] = {
    "cpu": _sim("cpu", None, None, None, {"torchao_int8_wo": True, "torchao_fp8_wo": True, "torchao_nf4": True}),
    "cpu-bare": _sim("cpu-bare", None, None, None, {}),
    "h100-bare": _sim("h100-bare", "NVIDIA H100 80GB HBM3", (9, 0), 79.2, {"scaled_mm_fp8": True}),
    "h100": _sim("h100", "NVIDIA H100 80GB HBM3", (9, 0), 79.2,
                 {"scaled_mm_fp8": True, "flash_attn_2": True, "flash_attn_3": True, "fa3_fwd": True,
                  "sageattn": True, "sage8_triton": True, "sage8_triton_bf16pv": True, "torchao_int8_wo": True, "torchao_fp8_dynamic": True, "torchao_nf4": True,
                  "torchao_fp8_wo": True,
                  "gguf": True}),
    "h100-fa3fwd": _sim("h100-fa3fwd", "NVIDIA H100 80GB HBM3", (9, 0), 79.2,
                        {"scaled_mm_fp8": True, "fa3_fwd": True, "torchao_int8_wo": True, "torchao_fp8_wo": True,
                         "torchao_fp8_dynamic": True}),
    "a100": _sim("a100", "NVIDIA A100-SXM4-80GB", (8, 0), 79.2,
                 {"flash_attn_2": True, "sageattn": True, "torchao_int8_wo": True, "torchao_nf4": True, "torchao_fp8_wo": True},
                 cuda_version="12.8"),
    "rtx5090": _sim("rtx5090", "NVIDIA GeForce RTX 5090", (12, 0), 31.4,
                    {"scaled_mm_fp8": True, "sageattn": True, "sageattn_3": True, "torchao_int8_wo": True,
                     "torchao_fp8_dynamic": True, "torchao_nvfp4": True, "torchao_nf4": True, "torchao_fp8_wo": True}),
    "b200": _sim("b200", "NVIDIA B200", (10, 0), 178.4,
                 {"scaled_mm_fp8": True, "torchao_int8_wo": True, "torchao_fp8_dynamic": True,
                  "torchao_fp8_wo": True}),
}


def simulated(name: str, **overrides: Any) -> Capabilities:
    """A simulated machine (`SIMULATED` keys); `overrides` replace top-level fields, `kernels=` entries merge."""
    if name not in SIMULATED:
        raise KeyError(f"unknown simulated machine {name!r}; choose one of: {', '.join(SIMULATED)}")
    data = {**SIMULATED[name], "kernels": dict(SIMULATED[name]["kernels"])}
    data["kernels"].update(overrides.pop("kernels", {}))
    data.update(overrides)
    caps = Capabilities.from_dict(data)
    missing = {}
    for key in KERNELS:  # entries not listed are missing, with the reason a real probe would give
        if key in caps.kernels:
            continue
        unmet = hardware_gate(caps, **_GATES[key]) if key in _GATES else None
        missing[key] = Kernel(False, unmet or f"package {_PACKAGE.get(key, key)} not installed")
    return dataclasses.replace(caps, kernels={**caps.kernels, **missing})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infinite_talk.testing.machines",
                                 description="the doctor table of a simulated machine")
    ap.add_argument("name", choices=sorted(SIMULATED))
    ap.add_argument("--json", action="store_true", help="print the capabilities and option table as JSON")
    args = ap.parse_args(argv)
    print_report(simulated(args.name), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
