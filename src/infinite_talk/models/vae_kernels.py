"""One fused kernel for the Wan VAE: channel RMS-norm (`x / max(|x|, 1e-12) * sqrt(C) * gamma`) followed by SiLU.

Every residual block of the VAE runs this pair twice at full activation size; as separate PyTorch ops it is a
float32 round trip plus several elementwise passes over the tensor. On CUDA tensors in channels-last-3d layout (the
layout `WanVae.use_channels_last` gives the convolutions) the channels of each voxel are contiguous, so one Triton
program reads a block of voxels once, reduces over channels in float32 and writes the result once. Everything else
(CPU, other layouts, a norm with a bias) takes `norm_silu_reference`, the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path runs
    triton = None


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, silu: bool = True,
                        bias_in: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused arithmetic of diffusers' `WanRMS_norm` (float32 normalisation, then in x's dtype) + SiLU, of
    `x + bias_in` (a per-channel bias the convolution before it left out) where given."""
    if bias_in is not None:
        x = x + bias_in.view(1, -1, 1, 1, 1)
    y = F.normalize(x.float(), dim=1).to(x.dtype) * (x.shape[1] ** 0.5) * gamma
    return F.silu(y) if silu else y


def fused_applies(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.ndim == 5
            and x.is_contiguous(memory_format=torch.channels_last_3d) and x.dtype in (torch.bfloat16, torch.float16,
                                                                                      torch.float32))


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, silu: bool = True,
              bias_in: torch.Tensor | None = None) -> torch.Tensor:
    """`norm_silu_reference`, fused where `fused_applies(x)`; the result keeps x's shape, dtype and layout."""
    if fused_applies(x):
        return fused_norm_silu(x, gamma, silu, bias_in)
    return norm_silu_reference(x, gamma, silu, bias_in)


def fused_norm_silu(x: torch.Tensor, gamma: torch.Tensor, silu: bool = True,
                    bias_in: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on a channels-last-3d tensor (any device Triton runs on, its CPU interpreter included)."""
    channels = x.shape[1]
    rows = x.numel() // channels
    out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 8192 // block_c)
    gamma = gamma.reshape(-1).contiguous()
    bias = gamma if bias_in is None else bias_in.reshape(-1).contiguous()  # any pointer when unused
    _norm_silu_rows[(triton.cdiv(rows, block_r),)](
        x, gamma, bias, out, rows, channels ** 0.5, CHANNELS=channels, BLOCK_C=block_c, BLOCK_R=block_r, SILU=silu,
        BIAS=bias_in is not None, num_warps=8)
    return out


if triton is not None:
    @triton.jit
    def _norm_silu_rows(x_ptr, gamma_ptr, bias_ptr, out_ptr, rows, scale, CHANNELS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, SILU: tl.constexpr, BIAS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_C)
        mask = (row[:, None] < rows) & (col[None, :] < CHANNELS)
        offsets = row[:, None] * CHANNELS + col[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if BIAS:  # rounded to x's dtype first, as the convolution's own bias add would be
            bias = tl.load(bias_ptr + col, mask=col < CHANNELS, other=0.0)
            x = (x.to(tl.float32) + bias.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        length = tl.sqrt(tl.sum(x * x, axis=1))
        gamma = tl.load(gamma_ptr + col, mask=col < CHANNELS, other=0.0).to(tl.float32)
        y = x / tl.maximum(length, 1e-12)[:, None] * scale * gamma[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
