"""8-bit attention of our own (Triton): INT8 Q·Kᵀ, then P·V in FP8 e4m3 or BF16 (docs/ARCHITECTURE.md, attention).

The method is SageAttention's (Zhang et al., SageAttention 1/2): quantize Q and K to int8 for the score matmul,
after subtracting from K its mean over the tokens (every score of a query moves by one constant, which softmax
ignores, and the int8 grid is no longer spent on the offset all keys share). Ours takes one scale per token (per row
of Q and of K, per head) rather than per block: the scales multiply the int32 scores row- and column-wise, which
costs one multiply per score and makes the error smaller than block scales do.

Two P·V variants (`pv`):
* "fp8": P (in [0, 1] after the online-softmax shift) times 448 in e4m3, V in e4m3 with one scale per channel;
  each key block's product is a fresh fp32 matmul result added into the outer fp32 accumulator (two-level
  accumulation: the fp8 tensor-core accumulation never runs over more than one block).
* "bf16": P in bf16 against V as given (bf16), fp32 accumulation: only the score matmul is 8-bit.

Softmax is online in fp32 (base-2 exponentials; the scale 1/sqrt(D)·log2(e) is folded into Q's scales).
`reference()` computes the same quantization in plain torch: the tests check the kernel against it (Triton's
interpreter on the CPU) and the format's error against float32 attention.

Layout: q, k, v are [B, L, H, D] bf16/fp16 (the dispatcher's layout), D a power of two from 16 to 256; the output is
[B, Lq, H, D] in q's dtype. Needs Triton and, for the fp8 variant, a GPU with fp8 tensor cores (sm >= 8.9): the
planner offers it only where `plan/probe.py`'s micro-test passed.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
PV_MODES = ("fp8", "bf16")
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp specialization]) per P·V variant: the fastest of a sweep on an
# H200 at the 480p shape (benchmarks/results/attention_sage8_h200.json)
DEFAULT_CONFIG = {"fp8": (128, 128, 8, 3), "bf16": (128, 64, 8, 3)}

_KERNELS = None


def _kernels():
    """Build the Triton kernels on first use (Triton is optional: imported only when the kernel runs)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def quant_rows(x_ptr, mean_ptr, out_ptr, scale_ptr, length, padded, heads, s_b, s_l, s_h, factor,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SUBTRACT_MEAN: tl.constexpr):
        """x [B, L, H, D] (strided) -> int8 [B*H, padded, D] and a scale per row [B*H, padded] (padding: 0)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bh = tl.program_id(1)
        b, h = bh // heads, bh % heads
        dims = tl.arange(0, HEAD_DIM)
        valid = rows < length
        x = tl.load(x_ptr + b * s_b + h * s_h + rows[:, None] * s_l + dims[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32)
        if SUBTRACT_MEAN:
            x = x - tl.load(mean_ptr + bh * HEAD_DIM + dims)[None, :]
            x = tl.where(valid[:, None], x, 0.0)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum(amax, 1e-12) / 127.0
        y = x / scale[:, None]
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero
        tl.store(out_ptr + (bh * padded + rows[:, None]) * HEAD_DIM + dims[None, :], y)
        tl.store(scale_ptr + bh * padded + rows, tl.where(valid, scale * factor, 0.0))

    @triton.jit
    def quant_v_fp8(v_ptr, scale_ptr, out_ptr, length, padded, heads, s_b, s_l, s_h,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """v [B, L, H, D] (strided) / per-channel scale [B*H, D] -> e4m3 transposed [B*H, D, padded]."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bh = tl.program_id(1)
        b, h = bh // heads, bh % heads
        dims = tl.arange(0, HEAD_DIM)
        x = tl.load(v_ptr + b * s_b + h * s_h + rows[:, None] * s_l + dims[None, :], mask=(rows < length)[:, None],
                    other=0.0).to(tl.float32)
        x = x / tl.load(scale_ptr + bh * HEAD_DIM + dims)[None, :]
        tl.store(out_ptr + (bh * HEAD_DIM + dims[None, :]) * padded + rows[:, None],
                 x.to(tl.float8e4nv, fp_downcast_rounding="rtne"))

    @triton.jit
    def attend(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, q_len, k_len, q_pad, k_pad, heads,
               sv_b, sv_l, sv_h, so_b, so_l, so_h,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
               EVEN_N: tl.constexpr, SPECIALIZE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1)
        b, h = bh // heads, bh % heads
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + (bh * q_pad + rows[:, None]) * HEAD_DIM + dims[None, :])
        q_scale = tl.load(qs_ptr + bh * q_pad + rows)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in tl.range(0, k_len, BLOCK_N, warp_specialize=SPECIALIZE):
            keys = start + cols
            k = tl.load(k_ptr + (bh * k_pad + keys[:, None]) * HEAD_DIM + dims[None, :])
            k_scale = tl.load(ks_ptr + bh * k_pad + keys)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
            if not EVEN_N:
                s = tl.where((keys < k_len)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PV_FP8:
                vt = tl.load(v_ptr + (bh * HEAD_DIM + dims[:, None]) * k_pad + keys[None, :])
                p8 = (p * 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
                block = tl.dot(p8, tl.trans(vt))  # this block's product alone, in fp32
            else:
                v = tl.load(v_ptr + b * sv_b + h * sv_h + keys[:, None] * sv_l + dims[None, :],
                            mask=(keys < k_len)[:, None], other=0.0)
                block = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + block  # outer fp32 accumulator
            m_i = m_new
        out = acc / l_i[:, None]
        if PV_FP8:
            out = out * (tl.load(vs_ptr + bh * HEAD_DIM + dims) / 448.0)[None, :]
        tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dims[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rows < q_len)[:, None])

    _KERNELS = (quant_rows, quant_v_fp8, attend)
    return _KERNELS


def _padded(length: int, block: int) -> int:
    return -(-length // block) * block


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str) -> None:
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be [B, L, H, D] with matching B, H, D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    dim = q.shape[-1]
    if dim < 16 or dim > 256 or dim & (dim - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {dim}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}")


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp8",
                   config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention softmax(q kᵀ / sqrt(D)) v with INT8 scores and `pv` ("fp8" or "bf16") values; [B, L, H, D]."""
    _check(q, k, v, pv)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernels index D densely
    quant_rows, quant_v_fp8, attend = _kernels()
    block_m, block_n, warps, stages, *specialize = config or DEFAULT_CONFIG[pv]
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    q_pad, k_pad = _padded(q_len, block_m), _padded(k_len, block_n)
    bh = batch * heads
    dev = q.device
    factor = LOG2E / math.sqrt(dim)
    q8 = torch.empty(bh, q_pad, dim, device=dev, dtype=torch.int8)
    q_scale = torch.empty(bh, q_pad, device=dev, dtype=torch.float32)
    quant_rows[(q_pad // block_m, bh)](q, q, q8, q_scale, q_len, q_pad, heads, q.stride(0), q.stride(1), q.stride(2),
                                       factor, HEAD_DIM=dim, BLOCK=block_m, SUBTRACT_MEAN=False)
    k_mean = k.float().mean(dim=1).contiguous()  # [B, H, D]
    k8 = torch.empty(bh, k_pad, dim, device=dev, dtype=torch.int8)
    k_scale = torch.empty(bh, k_pad, device=dev, dtype=torch.float32)
    quant_rows[(k_pad // block_n, bh)](k, k_mean, k8, k_scale, k_len, k_pad, heads, k.stride(0), k.stride(1),
                                       k.stride(2), 1.0, HEAD_DIM=dim, BLOCK=block_n, SUBTRACT_MEAN=True)
    if pv == "fp8":
        v_scale = (v.abs().amax(dim=1).float().clamp_min(1e-12) / FP8_MAX).contiguous()  # [B, H, D]
        v_in = torch.empty(bh, dim, k_pad, device=dev, dtype=torch.float8_e4m3fn)
        quant_v_fp8[(k_pad // block_n, bh)](v, v_scale, v_in, k_len, k_pad, heads, v.stride(0), v.stride(1),
                                            v.stride(2), HEAD_DIM=dim, BLOCK=block_n)
    else:
        v_scale, v_in = q_scale, v  # v_scale unused
    out = torch.empty(q.shape, device=dev, dtype=q.dtype)
    attend[(q_pad // block_m, bh)](
        q8, q_scale, k8, k_scale, v_in, v_scale, out, q_len, k_len, q_pad, k_pad, heads,
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, PV_FP8=pv == "fp8", EVEN_N=k_len % block_n == 0,
        SPECIALIZE=bool(specialize and specialize[0]),
        num_warps=warps, num_stages=stages,
    )
    return out


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Round-trip x [..., D] through int8 with one absmax scale per row (round half away from zero)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
    y = x / scale
    return torch.trunc(y + 0.5 * torch.sign(y)) * scale


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp8",
              smooth_keys: bool = True) -> torch.Tensor:
    """The kernel's quantization in plain torch (float32 otherwise): [B, L, H, D] in float32. `smooth_keys=False`
    leaves out the mean subtraction (to show what it buys).

    Differs from the kernel only in the softmax order: one max per row over all keys instead of the online
    per-block maxima, so P's fp8 values can differ by a rounding step; the tests allow for that."""
    _check(q, k, v, pv)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    if smooth_keys:
        kf = kf - kf.mean(dim=2, keepdim=True)
    scores = _int8_rows(qf) @ _int8_rows(kf).transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    total = p.sum(-1, keepdim=True)
    if pv == "fp8":
        v_scale = vf.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / FP8_MAX
        p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX
        out = p8 @ ((vf / v_scale).to(torch.float8_e4m3fn).float() * v_scale)
    else:
        out = p.to(q.dtype).float() @ vf
    return (out / total).transpose(1, 2)
