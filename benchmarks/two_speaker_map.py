"""The two-speaker routing's parts at the real shapes, per forward (x the 40 blocks): the first-frame attention map
(fused: one SDPA call with the speaker masks as values; dense: per-head float32 probabilities, as before) and the 1-D
RoPE of the audio attention's queries.

    python benchmarks/two_speaker_map.py --out map.json          # GPU
    python benchmarks/two_speaker_map.py --device cpu --tokens 2048 --frame-tokens 128 --blocks 1   # smoke test
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dit_forward import device_name, report, timed
from infinite_talk.models.transformer import first_frame_attention_map, rope_1d
from infinite_talk.testing.two_speaker import first_frame_map_per_head as dense_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--frame-tokens", type=int, default=1560)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.tokens, args.heads, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, args.frame_tokens, args.heads, 128, generator=g).to(device, torch.bfloat16)
    masks = torch.zeros(3, args.frame_tokens, device=device)
    third = args.frame_tokens // 3
    masks[0, :third], masks[1, third:2 * third], masks[2, 2 * third:] = 1, 1, 1
    positions = torch.rand(args.tokens, device=device) * 24
    parts = {"map_fused": lambda: first_frame_attention_map(q, k, masks), "map_dense": lambda: dense_map(q, k, masks),
             "rope_1d_queries": lambda: rope_1d(q, positions)}
    rows = {}
    with torch.inference_mode():
        for name, fn in parts.items():
            timed(fn, device, 1)
            rows[f"{name}_s_per_forward"] = round(statistics.median(timed(fn, device, args.iters)) * args.blocks, 4)
        fused, dense = first_frame_attention_map(q, k, masks), dense_map(q, k, masks)
    rows["fused_vs_dense_rel_l2"] = round(float((fused - dense).norm() / dense.norm()), 6)
    rows["routing_agreement"] = round(float((fused.argmax(0) == dense.argmax(0)).float().mean()), 5)
    report({"device": device_name(device), "tokens": args.tokens, "frame_tokens": args.frame_tokens,
            "blocks": args.blocks, **rows, "torch": torch.__version__}, args.out)


if __name__ == "__main__":
    main()
