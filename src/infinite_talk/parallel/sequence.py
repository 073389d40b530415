"""Sequence parallelism for the InfiniteTalk transformer: each process runs a contiguous slice of the video tokens.

Every process holds the whole transformer. After the patch embedding the tokens (and the 3-D RoPE tables) are cut
into one slice per process; the slices are gathered again after `proj_out`. Inside a block everything is per token
except three things, handled here:

* the self-attention is diffusers' context-parallel attention (`ContextParallelConfig`): Ulysses all-to-all over the
  heads, ring attention over key/value blocks, or both (`models/diffusers_adapter.context_parallel_attention`). A dispatcher
  backend with its own context-parallel support runs through `dispatch_attention_fn(parallel_config=...)`; any other
  kernel (FlashAttention-3, our fa3-fwd / SageAttention3, SDPA on the CPU with ring) becomes the local attention op
  inside diffusers' Ulysses (and, on the CPU, ring) code — the all-to-all and the ring merge stay diffusers';
* the frame-local audio cross-attention: a slice may start or end inside a latent frame, so the block passes the
  slice's global offset (`TokenShard.start`) and each token attends to its own frame's audio tokens;
* the two-speaker first-frame map: all tokens attend to the first latent frame's keys (`first_frame_keys` gathers
  them from the processes holding them) and each map row is rescaled by its min/max over all tokens
  (`row_extrema`: an all-reduce).

diffusers' `enable_parallelism` is not used: its hooks split fixed module inputs (our blocks take the slice offset
too), and it derives the device from the accelerator count, which is 0 on a CPU-only torch (tests run over gloo).
Slices of unequal length (tokens not divisible by the process count: only the tiny preset's frame sizes) use
diffusers' "anything" variants of Ulysses or ring attention; with both at once they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from torch.distributed.device_mesh import init_device_mesh

from ..errors import InputError, OptionError
from ..models.diffusers_adapter import (
    active_attention_backend,
    backend_supports_context_parallel,
    context_parallel_group,
    processor_attention_backend,
    set_processor_parallel_config,
)


def supports_context_parallel(backend: str) -> bool:
    """diffusers' dispatcher runs Ulysses/ring attention itself for this backend (False for our own kernels)."""
    try:
        name = AttentionBackendName(backend)
    except ValueError:  # fa3_fwd, sageattn3: attention_kernels.py
        return False
    return backend_supports_context_parallel(name)


def ring_capable(backend: str, device_type: str) -> bool:
    """Ring attention merges partial results by their log-sum-exp: the backend must return it. diffusers' `native`
    does not; on the CPU our op (`_cpu_attention_with_lse`) takes its place."""
    if backend == "native":
        return device_type == "cpu"
    return supports_context_parallel(backend)


class SequenceParallel:
    """The processes of one job as a (ring x ulysses) mesh, and the diffusers context-parallel config(s) on it.

    Build it on every process right after the process group starts (creating the mesh is a collective)."""

    def __init__(self, ulysses: int, ring: int, device: torch.device | str):
        self.ulysses, self.ring, self.size = ulysses, ring, ulysses * ring
        self.device = torch.device(device)
        mesh = init_device_mesh(self.device.type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
        self._configs = {False: self._config(mesh, anything=False)}
        if ring == 1 or ulysses == 1:  # diffusers' unequal-slice attention exists for one kind at a time
            self._configs[True] = self._config(mesh, anything=True)
        self.group = context_parallel_group(self._configs[False])
        self.rank = dist.get_rank(self.group)
        self._processors: list = []
        self._active: ParallelConfig | None = None

    def _config(self, mesh, anything: bool) -> ParallelConfig:
        cp = ContextParallelConfig(ring_degree=self.ring, ulysses_degree=self.ulysses,
                                   ulysses_anything=anything and self.ring == 1,
                                   ring_anything=anything and self.ulysses == 1)
        config = ParallelConfig(context_parallel_config=cp)
        config.setup(dist.get_rank(), dist.get_world_size(), self.device, mesh=mesh)
        return config

    def describe(self) -> str:
        return f"ulysses {self.ulysses} × ring {self.ring} over {self.size} processes"

    def attach(self, transformer) -> None:
        """Run `transformer` sequence-parallel: call after `set_attention_backend` (the local op depends on it)."""
        self._processors = []
        for block in transformer.blocks:
            processor = block.attn1.processor
            processor._cp_forward_op = self._local_op(processor)
            self._processors.append(processor)
        self._active = None
        self._use(uneven=False)
        transformer.sequence_parallel = self

    def _local_op(self, processor):
        """None when diffusers' dispatcher does the context-parallel attention itself, else the op it runs inside."""
        backend = processor_attention_backend(processor) or active_attention_backend()
        backend = getattr(backend, "value", backend)
        if processor._kernel is None and supports_context_parallel(backend) and (
                self.ring == 1 or backend != "native"):
            return None
        if self.ring > 1:
            if processor._kernel is None and backend == "native" and self.device.type == "cpu":
                return _cpu_attention_with_lse
            raise OptionError(f"ring attention needs an attention kernel that returns its log-sum-exp; "
                              f"'{getattr(processor._kernel, '__name__', backend)}' does not: use ring 1 or "
                              "attention auto")
        kernel = processor._kernel
        if kernel is None:
            def kernel(q, k, v, backend=backend):
                return dispatch_attention_fn(q, k, v, backend=backend)
        return _op_without_lse(kernel)

    def _use(self, uneven: bool) -> None:
        config = self._configs[uneven]
        if config is not self._active:
            for processor in self._processors:
                set_processor_parallel_config(processor, config)
            self._active = config

    def check_tokens(self, tokens: int) -> None:
        """Refuse a token count these processes cannot split (InputError, before any collective)."""
        if tokens < self.size:
            raise InputError(f"{tokens} video tokens cannot be split over {self.size} processes; use fewer "
                             "processes or a larger frame size")
        if tokens % self.size and True not in self._configs:
            raise InputError(f"{tokens} video tokens do not split evenly over {self.size} processes, which Ulysses "
                             f"and ring attention together need ({self.describe()}); use --ring 1 or --ulysses 1, "
                             "or another frame size")

    def shard(self, tokens: int, frame_tokens: int) -> TokenShard:
        """This process's slice of `tokens` (`frame_tokens` per latent frame), as `torch.tensor_split` cuts it."""
        self.check_tokens(tokens)
        uneven = tokens % self.size != 0
        self._use(uneven)
        base, extra = divmod(tokens, self.size)
        sizes = [base + (i < extra) for i in range(self.size)]
        return TokenShard(self, sum(sizes[:self.rank]), sizes[self.rank], tokens, frame_tokens, tuple(sizes), uneven)


@dataclass(frozen=True)
class TokenShard:
    """Global tokens `start .. start+length` of `total` held by this process, for one forward."""

    parallel: SequenceParallel
    start: int
    length: int
    total: int
    frame_tokens: int
    sizes: tuple[int, ...]
    uneven: bool

    def split(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return tensor.narrow(dim, self.start, self.length)

    def gather(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The slices of all processes, in order (every process gets the whole tensor). Unequal slices are padded
        to the longest for the all-gather (gloo gathers equal sizes only) and trimmed after."""
        longest = max(self.sizes)
        if self.length < longest:
            pad = list(tensor.shape)
            pad[dim] = longest - self.length
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim)
        parts = [torch.empty_like(tensor) for _ in self.sizes]
        dist.all_gather(parts, tensor.contiguous(), group=self.parallel.group)
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, self.sizes, strict=True)], dim)

    def first_frame_keys(self, key: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D]: the keys of the first latent frame (global tokens 0..S) from the processes holding them."""
        frame, group = self.frame_tokens, self.parallel.group
        if frame <= self.sizes[0]:  # all on the first process (whenever each slice holds at least a frame)
            keys = key[:, :frame].contiguous() if self.start == 0 else key.new_empty(
                key.shape[0], frame, *key.shape[2:])
            dist.broadcast(keys, src=dist.get_global_rank(group, 0), group=group)
            return keys
        keys = key.new_zeros(key.shape[0], frame, *key.shape[2:])
        held = max(0, min(frame, self.start + self.length) - self.start)
        keys[:, self.start:self.start + held] = key[:, :held]
        dist.all_reduce(keys, group=group)  # each key comes from one process, the others add zeros: exact
        return keys

    def row_extrema(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `rows` [C, length], its min and max over the tokens of all processes."""
        mins, maxs = rows.amin(-1).contiguous(), rows.amax(-1).contiguous()
        dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=self.parallel.group)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=self.parallel.group)
        return mins, maxs


# ---- local attention ops for diffusers' templated context-parallel attention ------------------------------------
# Signature of diffusers' forward ops: (ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
# return_lse, _save_ctx, _parallel_config), q/k/v [B, S, H, D]; returns out [B, S, H, D] (and lse [B, S, H]).

def _op_without_lse(kernel):
    """A single-process attention kernel as the op inside Ulysses (each process: its heads, all tokens)."""

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if return_lse or attn_mask is not None or is_causal or scale is not None:
            raise RuntimeError("this attention kernel runs only unmasked, non-causal attention without log-sum-exp")
        return kernel(query, key, value)

    return forward_op


def _cpu_attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """torch's CPU flash-attention kernel (what SDPA runs on the CPU), which also returns the log-sum-exp that ring
    attention merges by."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, attn_mask=attn_mask,
        scale=scale)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out
