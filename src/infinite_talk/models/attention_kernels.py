"""Attention kernels that diffusers' dispatcher does not know, called by our attention processors.

Each takes q, k, v as [B, L, H, D] (the dispatcher's layout) in bf16/fp16 and returns a contiguous [B, L, H, D] in
q's dtype. The planner only selects one after the probe's micro-test passed on this machine (`plan/probe.py`), so an
import failure here means the environment changed between probe and load, and is reported as such.

Each kernel is a `torch.library.custom_op` with a fake (shape-only) implementation: torch.compile keeps the call as
one opaque node of the block's graph instead of tracing into the wheel's Python (an `importlib` call or a Triton
launch wrapper would split every compiled block into several graphs, each recompiled per attention shape). The
wheel's module is imported when the op first runs, not while Dynamo traces.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..errors import OptionError
from .int8_attention import int8_attention

_MODULES: dict[str, object] = {}


def _module(name: str, package: str):
    """The kernel's module, imported once per process (a failed import is retried: it is raised, not cached)."""
    module = _MODULES.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise OptionError(f"attention kernel {package} passed the probe but no longer imports: {err}",
                              option="attention", value=package) from err
        _MODULES[name] = module
    return module


def _kernel_op(name: str):
    """Register `fn(q, k, v) -> [B, L, H, D]` as the custom op `infinite_talk::<name>` with its fake."""

    def wrap(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return fn(q, k, v).to(q.dtype).contiguous()

        run.__doc__ = fn.__doc__
        op = torch.library.custom_op(f"infinite_talk::{name}", run, mutates_args=())

        @op.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return q.new_empty(q.shape)  # contiguous, like every real output (`run`)

        return op

    return wrap


@_kernel_op("fa3_fwd")
def fa3_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward (the `fa3-fwd` wheel): Hopper, 701 TFLOP/s at the 480p shape on an H200."""
    out = _module("fa3_fwd_interface", "fa3-fwd").flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple | list) else out


@_kernel_op("sageattn3")
def sageattn3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention3 (FP4 microscaling, Blackwell); its API takes [B, H, L, D]."""
    fn = _module("sageattn3", "sageattn3").sageattn3_blackwell
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), per_block_mean=False)
    return out.transpose(1, 2)


@_kernel_op("sage8_triton")
def sage8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Our Triton 8-bit attention: INT8 Q·Kᵀ (per-token scales, smoothed K), FP8 e4m3 P·V (`int8_attention.py`)."""
    return int8_attention(q, k, v, pv="fp8")


@_kernel_op("sage8_triton_bf16pv")
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
