"""Our 8-bit attention (models/int8_attention.py), its planning, the fused two-speaker map and the compile cache.

The Triton kernel itself runs on a GPU; here its quantization is checked through `reference()` (the same maths in
plain torch) and, where Triton is installed, the kernel through Triton's CPU interpreter against that reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from infinite_talk.errors import OptionError
from infinite_talk.models import compilation
from infinite_talk.models.int8_attention import reference
from infinite_talk.models.transformer import first_frame_attention_map
from infinite_talk.options import LoadOptions
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import Kernel, _run_check, probe
from infinite_talk.testing.machines import simulated
from infinite_talk.testing.two_speaker import first_frame_map_per_head


def _qkv(q_len=192, k_len=160, heads=2, dim=64, key_offset=2.0, sharpness=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_len, heads, dim, generator=g) * sharpness
    k = torch.randn(1, k_len, heads, dim, generator=g) + key_offset * torch.randn(1, 1, heads, dim, generator=g)
    v = torch.randn(1, k_len, heads, dim, generator=g)
    return q, k, v


def _float32_attention(q, k, v):
    return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- the quantization ------------------------------------------------------------------------------------------
def test_key_smoothing_makes_the_scores_blind_to_an_offset_all_keys_share():
    q, k, v = (t.bfloat16() for t in _qkv(key_offset=0.0))
    k = (k.float() * 16).round().clamp(-60, 60) / 16  # a 1/16 grid: k + an integer shift stays exact in bf16
    shift = torch.randint(-8, 9, (1, 1, 2, 64), generator=torch.Generator().manual_seed(1)).float()
    for pv in ("fp8", "bf16"):
        plain, shifted = reference(q, k.bfloat16(), v, pv), reference(q, (k + shift).bfloat16(), v, pv)
        assert _rel(shifted, plain) < 1e-3, pv
    # without the smoothing the same shift costs int8 resolution: the error against float32 grows
    exact = _float32_attention(q, k + shift, v)
    unsmoothed = reference(q, (k + shift).bfloat16(), v, "bf16", smooth_keys=False)
    assert _rel(unsmoothed, exact) > 1.5 * _rel(reference(q, (k + shift).bfloat16(), v, "bf16"), exact)


def test_quantization_error_against_float32_per_format():
    q, k, v = _qkv()
    exact = _float32_attention(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    bf16_floor = _rel(_float32_attention(qb, kb, vb), exact)
    int8_bf16 = _rel(reference(qb, kb, vb, "bf16"), exact)
    int8_fp8 = _rel(reference(qb, kb, vb, "fp8"), exact)
    # INT8 scores cost accuracy over plain bf16 inputs; FP8 P·V (3 mantissa bits for P and V) costs more again
    assert bf16_floor < int8_bf16 < 0.03
    assert int8_bf16 < int8_fp8 < 0.06
    assert torch.isfinite(reference(qb, kb, vb, "fp8")).all()


def test_reference_rejects_what_the_kernel_cannot_take():
    q, k, v = (t.bfloat16() for t in _qkv())
    with pytest.raises(ValueError, match="pv must be one of"):
        reference(q, k, v, "fp4")
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        reference(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="must all be bf16 or fp16"):
        reference(q.float(), k.float(), v.float())


_INTERPRETER_RUN = textwrap.dedent("""
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as interp

    # Two shims for Triton 3.6's interpreter, not for the kernel: scalars there are 1-element arrays that numpy >= 2
    # will not turn into an index, and its float32 -> e4m3 cast truncates (and can drop a carry), where the GPU
    # rounds to nearest even; torch's cast is the GPU's.
    patch = interp._patch_lang_tensor
    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = patched
    convert = interp._convert_float
    def rounded(data, src, dst, mode):
        if src == tl.float32 and dst == tl.float8e4nv:
            x = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.float32).reshape(data.shape).copy())
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return convert(data, src, dst, mode)
    interp._convert_float = rounded

    from infinite_talk.models.int8_attention import int8_attention, reference
    g = torch.Generator().manual_seed(3)
    out = {}
    for pv in ("bf16", "fp8"):
        # fp16: the interpreter has no bf16 matmul; 200 x 130 leaves partial blocks on both sides
        q = torch.randn(1, 200, 2, 64, generator=g).half()
        k = (torch.randn(1, 130, 2, 64, generator=g) + 1.5).half()
        v = torch.randn(1, 130, 2, 64, generator=g).half()
        got = int8_attention(q, k, v, pv, config=(64, 32, 4, 1))
        ref = reference(q, k, v, pv)
        exact = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        rel = lambda a, b: float((a.float() - b).norm() / b.norm())
        out[pv] = {"vs_reference": rel(got, ref), "vs_float32": rel(got, exact), "ref_vs_float32": rel(ref, exact),
                   "shape": list(got.shape), "finite": bool(torch.isfinite(got).all())}
    print(json.dumps(out))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None and not os.environ.get("CI"),
                    reason="Triton is not installed here (CI installs it: the test extras)")
def test_triton_kernel_matches_its_reference_in_the_interpreter():
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_RUN], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for pv in ("bf16", "fp8"):
        assert res[pv]["shape"] == [1, 200, 2, 64] and res[pv]["finite"]
    assert res["bf16"]["vs_reference"] < 2e-3  # same quantization, same rounding: only the summation order differs
    # fp8: the kernel scales P by each block's running maximum (online softmax), the reference by the row maximum,
    # so P's fp8 roundings differ; the error against float32 must be the format's, not more
    assert res["fp8"]["vs_reference"] < 0.03
    assert res["fp8"]["vs_float32"] < 1.15 * res["fp8"]["ref_vs_float32"]


# ---- planning ------------------------------------------------------------------------------------------------------
def test_explicit_choice_runs_only_where_its_micro_test_passed():
    caps = simulated("h100")
    plan = resolve(LoadOptions(attention="sage8_triton"), caps)
    assert (plan.attention_kernel, plan.attention_backend, plan.attention_provider) == (
        "sage8_triton", "sage8_triton", "infinite_talk")
    assert "FP8 e4m3 P·V" in plan.options["attention"].reason
    failed = dataclasses.replace(caps, kernels={**caps.kernels, "sage8_triton": Kernel(
        False, "micro-test failed: RuntimeError: int8_attention pv=fp8: relative error 0.2 > 0.05")})
    with pytest.raises(OptionError, match="sage8_triton: micro-test failed: RuntimeError: int8_attention pv=fp8: "
                                          "relative error 0.2"):
        resolve(LoadOptions(attention="sage8_triton"), failed)
    with pytest.raises(OptionError, match="attention=sage8_triton_bf16pv: needs model_precision bf16 or fp16"):
        resolve(LoadOptions(attention="sage8_triton_bf16pv", model_precision="fp32"), caps)


def test_auto_names_why_it_skips_the_8bit_kernels():
    reason = resolve(LoadOptions(), simulated("h100")).options["attention"].reason
    assert "sage8_triton/sage8_triton_bf16pv only when requested" in reason


def test_probe_says_why_not_on_a_cpu():
    caps = probe()
    if caps.gpu:
        pytest.skip("this machine has a GPU")
    for key in ("sage8_triton", "sage8_triton_bf16pv"):
        k = _run_check(key, caps)
        assert not k.available and k.reason == {
            "sage8_triton": "needs a CUDA GPU with sm >= 8.9 (fp8 tensor cores); this machine has none",
            "sage8_triton_bf16pv": "needs a CUDA GPU with sm >= 8.0; this machine has none"}[key]


# ---- the fused two-speaker map -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_first_frame_map_equals_the_dense_one(dtype, tol):
    g = torch.Generator().manual_seed(0)
    query = (torch.randn(1, 300, 4, 32, generator=g) * 2).to(dtype)
    ref_key = (torch.randn(1, 60, 4, 32, generator=g) * 2).to(dtype)
    masks = torch.zeros(3, 60)
    masks[0, :20], masks[1, 20:45], masks[2, 45:] = 1, 1, 1
    fused, dense = first_frame_attention_map(query, ref_key, masks), first_frame_map_per_head(query, ref_key, masks)
    assert fused.shape == (3, 300) and fused.dtype == torch.float32
    assert _rel(fused, dense) < tol
    assert (fused.argmax(0) == dense.argmax(0)).float().mean() > 0.98  # the routing decision


def test_two_speaker_forward_routes_as_the_dense_map_would(monkeypatch):
    from infinite_talk.models import transformer as tr
    from infinite_talk.models.configs import GEOMETRIES

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from dit_forward import build_model, make_inputs

    cfg = GEOMETRIES["tiny"].dit
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    inputs = make_inputs(cfg, torch.device("cpu"), 3, 8, 8, speakers=2)
    inputs["ref_target_masks"][0, :, :4] = 0
    inputs["ref_target_masks"][1, :, 4:] = 0
    with torch.inference_mode():
        fused = model(**inputs)
        maps = [b.last_ref_map.clone() for b in model.blocks]
        monkeypatch.setattr(tr, "first_frame_attention_map", first_frame_map_per_head)
        dense = model(**inputs)
    assert _rel(fused, dense) < 1e-4
    assert all(_rel(m, b.last_ref_map) < 1e-4 for m, b in zip(maps, model.blocks))


# ---- the compile cache ---------------------------------------------------------------------------------------------
def test_compile_cache_goes_under_the_project_cache_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITE_TALK_CACHE", str(tmp_path / "it"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    default = compilation._inductor_default()
    if default is not None:  # the value Inductor writes itself counts as unset
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)
    else:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    dirs = compilation.use_compile_cache()
    assert dirs == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "it" / "compile" / "inductor"),
                    "TRITON_CACHE_DIR": str(tmp_path / "it" / "compile" / "triton")}
    assert all(os.path.isdir(d) for d in dirs.values())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation.use_compile_cache()["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_compile_blocks_wraps_each_repeated_block(tmp_path, monkeypatch):
    from infinite_talk.models.configs import GEOMETRIES
    from infinite_talk.models.transformer import InfiniteTalkTransformer

    monkeypatch.setenv("INFINITE_TALK_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    model = InfiniteTalkTransformer.from_dit_config(GEOMETRIES["tiny"].dit)
    assert compilation.compile_blocks(model) == len(model.blocks)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)
    assert getattr(model.audio_proj, "_compiled_call_impl", None) is None  # only the repeated blocks
