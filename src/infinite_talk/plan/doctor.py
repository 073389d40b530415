"""`infinite-talk doctor`: what this machine can run, and what each load option value resolves to here.

`python -m infinite_talk.plan.doctor [--json]` (simulated machines: `python -m infinite_talk.testing.machines NAME`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import OptionError
from ..options import LoadOptions
from .planner import resolve
from .probe import KERNELS, Capabilities, probe

OPTION_FIELDS = ("model_precision", "vae_precision", "quantization", "t5_quantization", "attention")


def _gib(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f} GiB"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return [fmt.format(*header), fmt.format(*("-" * len(h) for h in header)), *(fmt.format(*r) for r in rows)]


def option_rows(caps: Capabilities) -> list[tuple[str, str, str]]:
    """(option=value, effective or 'refused', reason) for every choice of every LoadOptions field with choices,
    each resolved with the other options at their defaults."""
    rows = []
    fields = {f.name: f for f in dataclasses.fields(LoadOptions)}
    for name in OPTION_FIELDS:
        for value in fields[name].metadata["choices"]:
            try:
                r = resolve(LoadOptions(**{name: value}), caps).options[name]
                rows.append((f"{name}={value}", r.effective, r.reason))
            except OptionError as err:
                reason = str(err).split(": ", 1)[1] if str(err).startswith(f"{name}={value}: ") else str(err)
                rows.append((f"{name}={value}", "refused", reason))
    return rows


def doctor_report(caps: Capabilities) -> str:
    lines = ["Infinite Talk doctor" + (f" (simulated machine: {caps.simulated})" if caps.simulated else "")]
    if caps.gpu:
        g = caps.gpu
        lines.append(f"GPU:      {g.name} ({g.sm}), {_gib(g.total_memory_gib)} total, {_gib(g.free_memory_gib)} free; "
                     f"{caps.gpu_count} GPU(s)")
    else:
        lines.append("GPU:      none (CPU only)")
    lines.append(f"host RAM: {_gib(caps.host_ram_gib)} total, {_gib(caps.host_ram_available_gib)} available; "
                 f"CPU native bf16: {'yes' if caps.cpu_native_bf16 else 'no'}")
    lines.append(f"software: Python {caps.python_version}, torch {caps.torch_version}, CUDA {caps.cuda_version or '-'}, "
                 f"cuDNN {caps.cudnn_version or '-'}, driver {caps.driver_version or '-'}")
    lines.append("")
    rows = []
    for key in KERNELS:
        k = caps.kernel(key)
        rows.append((key, "yes" if k.available else "no", k.version or "-", k.reason))
    lines += _table(rows, ("kernel/library", "available", "version", "reason"))
    lines.append("")
    lines.append("load options on this machine (others at their defaults):")
    lines += _table(option_rows(caps), ("option", "effective", "reason"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infinite-talk doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the probe and option table as JSON")
    args = ap.parse_args(argv)
    print_report(probe(), as_json=args.json)
    return 0


def print_report(caps: Capabilities, as_json: bool = False) -> None:
    """The doctor table (or its JSON) of these capabilities: this machine's, or a simulated one (testing/)."""
    if as_json:
        rows = [{"option": o, "effective": e, "reason": r} for o, e, r in option_rows(caps)]
        print(json.dumps({"capabilities": caps.to_dict(), "options": rows}, indent=2))
    else:
        print(doctor_report(caps))


if __name__ == "__main__":
    sys.exit(main())
