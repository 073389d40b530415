"""The transformer's GEMM shapes at 480p (32,760 tokens): bf16 against fp8 `torch._scaled_mm` with one scale per
tensor and with one scale per row (torchao's PerRow, what `--quantization fp8` runs), in TFLOP/s.

    python benchmarks/fp8_gemm.py --out gemm.json      # GPU with fp8 GEMMs (sm >= 8.9)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dit_forward import device_name, report, timed

# (name, K, N) of y[M, N] = x[M, K] @ W^T: q/k/v/o and cross-attention projections, FFN up, FFN down
SHAPES = [("proj 5120x5120", 5120, 5120), ("ffn up 5120x13824", 5120, 13824), ("ffn down 13824x5120", 13824, 5120)]


def measure(m: int, k: int, n: int, device, iters: int) -> dict[str, float]:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    row_a, row_b = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
    variants = {
        "bf16": lambda: x @ w.t(),
        "fp8 tensorwise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "fp8 rowwise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=row_a, scale_b=row_b, out_dtype=torch.bfloat16),
    }
    out = {}
    for label, fn in variants.items():
        timed(fn, device, 3)
        out[label] = statistics.median(timed(fn, device, iters))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    m = args.tokens
    rows = []
    for name, k, n in SHAPES:
        for label, seconds in measure(m, k, n, device, args.iters).items():
            rows.append({"shape": name, "variant": label, "ms": round(seconds * 1e3, 3),
                         "tflops": round(2 * m * k * n / seconds / 1e12, 1)})
            print(rows[-1], flush=True)
    report({"device": device_name(device), "tokens": m, "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
