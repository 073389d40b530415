"""GPU check of the pipeline's quantized low-VRAM path: quantized in host memory (as `load_models` does when the
transformer is offloaded), then blocks swapped to the GPU in compact form (`apply_offload`), against the same model
quantized on the GPU and kept whole. Prints one line per mode and writes JSON.

    python benchmarks/offload_check.py --out offload_check.json      # a CUDA GPU (fp8 GEMMs need sm >= 8.9)

The outputs must agree to rounding: the same quantized values, only computed after a host round trip. A
mismatch or an exception is a failure of the path `--quantization X --offload blocks:N` runs.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dit_forward import device_name, report
from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.offload import apply_offload
from infinite_talk.models.placement import Offload, swap_for
from infinite_talk.models.quantize import quantize_transformer
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.presets.tiny_transformer import random_transformer_inputs

# six blocks of a geometry whose Linear sizes fp8 GEMMs take (multiples of 16)
GEOMETRY = dataclasses.replace(GEOMETRY_TINY, dit=dataclasses.replace(GEOMETRY_TINY.dit, num_layers=6))


def model(seed: int = 0) -> InfiniteTalkTransformer:
    torch.manual_seed(seed)
    m = InfiniteTalkTransformer.from_dit_config(GEOMETRY.dit).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="fp8-compute,fp8-storage,int8-weight-only,nf4")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the blocks of the swapped model and count the graphs dynamo builds")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in random_transformer_inputs(GEOMETRY, h=16, w=16).items()}
    rows = []
    for mode in args.modes.split(","):
        row = {"mode": mode}
        try:
            whole = model()
            quantize_transformer(whole, mode, device)
            whole.to(device)
            swapped = model()
            quantize_transformer(swapped, mode, "cpu")  # the offloaded pipeline's order
            report_ = apply_offload(swapped, Offload("blocks", 4, swap_for(mode)), device)
            if args.compile:  # as the pipeline does (after placing)
                torch._dynamo.reset()
                for block in swapped.blocks:
                    block.compile()
            with torch.inference_mode():
                a, b = whole(**inputs).float(), swapped(**inputs).float()
                b2 = swapped(**inputs).float()  # a second call reuses the slots
                for _ in range(3):
                    b2 = swapped(**inputs).float()
            if args.compile:
                from torch._dynamo.utils import counters

                row["graphs"] = dict(counters["stats"])
                row["recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else None
            row.update(mechanism=report_.get("mechanism"), swapped_blocks=report_["swapped_blocks"],
                       rel_l2=float((a - b).norm() / a.norm()), repeat_equal=bool(torch.equal(b, b2)),
                       weight_type=type(swapped.blocks[0].ffn.net[2].weight).__name__)
            row["ok"] = row["rel_l2"] < 1e-2 and row["repeat_equal"]
        except Exception as err:
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
        print(row, flush=True)
    report({"device": device_name(device), "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
