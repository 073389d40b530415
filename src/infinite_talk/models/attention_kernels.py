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
from .int8_attention import int8_attention


def _module(name: str, package: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise OptionError(f"attention kernel {package} passed the probe but no longer imports: {err}",
                          option="attention", value=package) from err


def fa3_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward (the `fa3-fwd` wheel): Hopper, 701 TFLOP/s at the 480p shape on an H200."""
    out = _module("fa3_fwd_interface", "fa3-fwd").flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple | list) else out


def sageattn3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention3 (FP4 microscaling, Blackwell); its API takes [B, H, L, D]."""
    fn = _module("sageattn3", "sageattn3").sageattn3_blackwell
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), per_block_mean=False)
    return out.transpose(1, 2)


def sage8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Our Triton 8-bit attention: INT8 Q·Kᵀ (per-token scales, smoothed K), FP8 e4m3 P·V (`int8_attention.py`)."""
    return int8_attention(q, k, v, pv="fp8")


def sage8_triton_bf16pv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Our Triton attention with INT8 Q·Kᵀ and BF16 P·V (only the score matmul is 8-bit)."""
    return int8_attention(q, k, v, pv="bf16")


# planner backend name (plan.attention_backend when plan.attention_provider == "infinite_talk") -> kernel
KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fa3_fwd": fa3_fwd,
    "sageattn3": sageattn3,
    "sage8_triton": sage8_triton,
    "sage8_triton_bf16pv": sage8_triton_bf16pv,
}
