"""The README's speed table, regenerated from benchmarks/results/*.json (the numbers of one card, each row from one
benchmark run with that run's own bf16 matmul rate).

    python benchmarks/speed_table.py            # prints the Markdown table
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _attention(name: str, kernel: str) -> str:
    every = _load(name)["rows"]
    rows = [r for r in every if r["kernel"] == kernel and "ms" in r]
    ms = min(r["ms"] for r in every if r["kernel"].split("@")[0] == kernel and "ms" in r)  # best block config
    errs = "/".join(f"{r['rel_l2_vs_fp32']:.3f}" for r in rows)
    return f"{ms:.1f} ms, rel-L2 vs fp32 {errs} (flat/peaky)"


def rows() -> list[tuple[str, str, str]]:
    out = []

    def forward(label, name):
        d = _load(name)
        out.append((label, f"{d['seconds_per_forward']:.3f} s", f"{d['matmul_tflops']:.0f}"))
        return d

    forward("DiT forward 480p, bf16, FA3, eager", "dit_h200_480_compare_attention.json")
    forward("DiT forward 480p, bf16, FA3, compiled", "dit_h200_480_fa3_bf16_compile.json")
    d = forward("DiT forward 480p, fp8, FA3, compiled", "dit_h200_480_fa3_fp8_compile.json")
    out.append(("two speakers, extra per forward (fp8 compiled)", f"+{d['two_speakers']['overhead_s']:.3f} s",
                f"{d['matmul_tflops']:.0f}"))
    e = _load("dit_h200_480_compare_attention.json")
    out.append(("two speakers, extra per forward (bf16 eager)", f"+{e['two_speakers']['overhead_s']:.3f} s",
                f"{e['matmul_tflops']:.0f}"))
    m = _load("two_speaker_map_h200_480.json")
    out.append(("two speakers: first-frame map per forward, fused / dense (before)",
                f"{m['map_fused_s_per_forward']:.3f} s / {m['map_dense_s_per_forward']:.3f} s", "-"))
    s = forward("DiT forward 480p, bf16, FA3, eager (same run as the next two rows)",
                "dit_h200_480_compare_sage8_default.json")
    for row in s["compare_attention"]:
        out.append((f"DiT forward 480p, bf16, {row['attention']}, eager",
                    f"{row['seconds_per_forward']:.3f} s (rel-L2 vs the FA3 forward {row['rel_l2_vs_reference']:.3f})",
                    f"{s['matmul_tflops']:.0f}"))
    forward("DiT forward 720p (75,600 tokens), fp8, FA3, eager", "dit_h200_720_fa3_fp8.json")
    forward("DiT forward 720p (75,600 tokens), bf16, FA3, eager", "dit_h200_720_fa3_bf16.json")
    c = _load("chunk_h200_480_fast_fp8_fa3_compile.json")
    out.append(("fast chunk 480p (4 steps x 1 pass, fp8, compiled)",
                f"{c['chunk_s']:.2f} s ({c['real_time_factor']:.2f}x real time; decode {c['stages_s']['decode']:.2f} s)",
                f"{c['matmul_tflops_bf16']:.0f}"))
    v = {r["variant"]: r for r in _load("vae_speed_fused_h200_480.json")["rows"]}
    base, fused = v["channels_last"], v["channels_last+fused"]
    out.append(("VAE decode / encode 480p, bf16: fused kernels / before (same run)",
                f"{fused['decode_s']:.2f} / {fused['encode_s']:.2f} s; before {base['decode_s']:.2f} / "
                f"{base['encode_s']:.2f} s (decode rel-L2 vs fp32 {fused['decode_rel_l2_vs_first']:.3f} / "
                f"{base['decode_rel_l2_vs_first']:.3f})", "-"))
    load = _load("load_speed_h200_14b.json")
    for r in load["rows"]:
        out.append((f"load 14B transformer ({load['checkpoint_gb']:.1f} GB, 7 shards + adapter), {r['quantization']}, "
                    f"page cache {r['page_cache']}", f"{r['total_s']:.1f} s ({r['effective_gb_s']:.2f} GB/s)", "-"))
    cold = _load("cold_start_h200_480_fp8.json")["runs"]
    out.append(("first fp8 compiled forward: fresh process / second process (compile cache)",
                f"{cold[0]['first_forward_s']:.0f} s / {cold[1]['first_forward_s']:.1f} s", "-"))
    one = _load("cold_start_h200_480_fp8_custom_op.json")["runs"][0]
    warm = _load("dit_h200_480_fa3_fp8_compile_custom_op.json")
    out.append(("same, attention kernels as custom ops (one block graph, 0 graph breaks): fresh process / next "
                "process's first forward (dit_forward.py, cache warm)",
                f"{one['first_forward_s']:.0f} s / {warm['first_call_s']:.1f} s", "-"))
    for label, kernel in (("attention 480p: FA3 bf16", "fa3_fwd"), ("attention 480p: sage8_triton", "sage8_triton"),
                          ("attention 480p: sage8_triton_bf16pv", "sage8_triton_bf16pv")):
        out.append((label, _attention("attention_sage8_h200.json", kernel),
                    f"{_load('attention_sage8_h200.json')['matmul_tflops_bf16']:.0f}"))
    return out


def main() -> None:
    device = _load("dit_h200_480_fa3_fp8_compile.json")["device"]
    print(f"| {device}, 81 frames, random weights | time | bf16 matmul TFLOP/s (same run) |")
    print("| --- | --- | --- |")
    for label, value, rate in rows():
        print(f"| {label} | {value} | {rate} |")


if __name__ == "__main__":
    main()
