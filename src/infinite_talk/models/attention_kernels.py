"""Attention kernels that diffusers' dispatcher does not know, called by our attention processors.

Each takes q, k, v as [B, L, H, D] (the dispatcher's layout) in bf16/fp16 and returns [B, L, H, D]. The planner only
selects one after the probe's micro-test passed on this machine (`plan/probe.py`), so an import failure here means
the environment changed between probe and load, and is reported as such.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..errors import OptionError


def _module(name: str, package: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise OptionError(f"attention kernel {package} passed the probe but no longer imports: {err}") from err


def fa3_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward (the `fa3-fwd` wheel): Hopper, 701 TFLOP/s at the 480p shape on an H200."""
    out = _module("fa3_fwd_interface", "fa3-fwd").flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple | list) else out


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (e4m3 values scaled so each (batch, head) uses the full fp8 range, descale [B, H] fp32)."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-6)  # [B, H]
    scale = FP8_MAX / amax
    x8 = (x.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8, (1.0 / scale).contiguous()


def fa3_fwd_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward with fp8 e4m3 Q, K, V (the `fa3-fwd` wheel's descale path), bf16 output.

    K is smoothed first (its mean over the sequence subtracted: every query's logits shift by one constant, which
    softmax ignores, SageAttention's trick) so the per-head scale is spent on what differs between keys; Q, K and V
    then get one scale per (batch, head) from their absolute maximum, and the kernel multiplies the descales back.
    """
    fn = _module("fa3_fwd_interface", "fa3-fwd").flash_attn_func
    k = k - k.mean(dim=1, keepdim=True)
    (q8, q_descale), (k8, k_descale), (v8, v_descale) = _fp8_per_head(q), _fp8_per_head(k), _fp8_per_head(v)
    out = fn(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    out = out[0] if isinstance(out, tuple | list) else out
    return out.to(q.dtype)


def sageattn3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention3 (FP4 microscaling, Blackwell); its API takes [B, H, L, D]."""
    fn = _module("sageattn3", "sageattn3").sageattn3_blackwell
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), per_block_mean=False)
    return out.transpose(1, 2)


# planner backend name (plan.attention_backend when plan.attention_provider == "infinite_talk") -> kernel
KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fa3_fwd": fa3_fwd,
    "fa3_fwd_fp8": fa3_fwd_fp8,
    "sageattn3": sageattn3,
}
