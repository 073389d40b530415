"""Weights that live in host memory and visit the GPU only while they run, on diffusers' group-offloading machinery.

Settings (`LoadOptions.offload`; the memory plan resolves `auto`, `plan/memory.py`):

* `none` — every transformer weight stays on the GPU.
* `blocks:N` — N of the transformer blocks live in pinned host memory. Each is a diffusers `ModuleGroup` with a
  `GroupOffloadingHook`: copied to the GPU on a side CUDA stream while the block before it computes, used, then
  dropped from the GPU again. The other blocks, the embeddings and the head stay on the GPU. diffusers'
  `apply_group_offloading(offload_type="block_level")` cannot do this: it offloads *every* block of a ModuleList.
  The swapped blocks are spread evenly (every other block for N <= L/2), so a swapped block usually follows a
  resident one: its copy overlaps that block's compute and at most one swapped block occupies the GPU at a time
  (two when N > L/2). Quantized blocks (torchao fp8/int8/NF4 tensor subclasses) are swapped in their compact form
  by `CompactBlockSwap`, our equivalent of diffusers' hook: diffusers' copy (`param.data = pinned.to(...,
  non_blocking=True)`) fails on them with torchao 0.18 (seen on an H200: torchao asserts on `non_blocking`, and a
  plain copy then fails on the storage swap), so ours copies their inner tensors (`__tensor_flatten__`) and
  rebuilds the parameter around them.
* `sequential` — diffusers leaf-level group offloading (`apply_group_offloading(offload_type="leaf_level")`, with a
  stream on CUDA): every layer is copied just before it runs. Least GPU memory, most copying.

Encoders leave the GPU after use when the plan says so: `offload_after_use` keeps one (CLIP) in host memory and moves
it to the GPU for each call with one model-level `ModuleGroup`; T5 (10.6 GiB in bf16) is streamed layer by layer with
`apply_sequential`, so at most its two largest layers (the 2.1 GB token embedding) are on the GPU at once.

On a CPU-only run these hooks have nothing to move; the planner refuses `blocks:N` and `sequential` there. The hooks
themselves run with onload and offload device both "cpu" (no stream), which is how the tests check the wiring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import torch
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import InfiniteTalkError, OptionError
from .diffusers_adapter import (
    ModuleGroup,
    add_block_group,
    add_model_group,
    chain_block_groups,
    group_offloading_hook,
    remove_group_offloading_hooks,
)
from .placement import Offload
from .quantize import weight_bytes

_PREFETCH = "infinite_talk_prefetch"
_COMPACT_SWAP = "infinite_talk_compact_swap"


def swapped_block_indices(num_blocks: int, n: int) -> list[int]:
    """Which blocks live in host memory for `blocks:n`: spread evenly, ending with the last block
    (n = L/2 gives every odd block, n = 1 the last one, n = L all)."""
    if not 0 <= n <= num_blocks:
        raise ValueError(f"cannot swap {n} of {num_blocks} blocks")
    return [(j + 1) * num_blocks // n - 1 for j in range(n)]


def blocks_in_flight(num_blocks: int, n: int) -> int:
    """Swapped blocks on the GPU at once: the running one, plus the next while it is copied if that is swapped too."""
    swapped = set(swapped_block_indices(num_blocks, n))
    if not swapped:
        return 0
    return 2 if any(i + 1 in swapped for i in swapped) else 1


class Prefetch(ModelHook):
    """On a module that runs just before a swapped block: start copying that block to the GPU (on the group's
    side stream), so the copy overlaps this module's compute. The block's own hook waits for the copy."""

    def __init__(self, group: ModuleGroup):
        super().__init__()
        self.group = group

    def pre_forward(self, module, *args, **kwargs):
        self.group.onload_()
        return args, kwargs


def _registry(module: torch.nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def move_module(module: torch.nn.Module, device) -> None:
    """`module.to(device)`, with quantized parameters copied in their compact form (`copy_tensor`)."""
    device = torch.device(device)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and is_quantized_tensor(p) and p.device != device:
                sub._parameters[name] = torch.nn.Parameter(copy_tensor(p.detach(), device), requires_grad=False)
    module.to(device)


def _move_resident(model: torch.nn.Module, device: torch.device, skip: set[int]) -> None:
    """Everything of the transformer except the blocks in `skip` to `device`."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for i, block in enumerate(model.blocks):
        if i not in skip:
            move_module(block, device)
    for tensor in [*model._parameters.values(), *model._buffers.values()]:
        if tensor is not None:
            tensor.data = tensor.data.to(device)


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A torchao-style tensor subclass whose data lives in inner tensors (fp8/int8/NF4 weights)."""
    return is_traceable_wrapper_subclass(tensor)


def _map_inner(tensor: torch.Tensor, fn, device: torch.device | None = None) -> torch.Tensor:
    """`fn` applied to every plain tensor inside `tensor` (recursing into tensor subclasses), the subclass rebuilt
    around the results. `device` is where the results live: written into the subclass' metadata where it keeps
    one (NF4 records its device in `tensor_meta`; Float8/Int8 take it from their inner tensors)."""
    if not is_quantized_tensor(tensor):
        return fn(tensor)
    names, ctx = tensor.__tensor_flatten__()
    inner = {name: _map_inner(getattr(tensor, name), fn, device) for name in names}
    meta = ctx.get("tensor_meta") if isinstance(ctx, dict) else None
    if device is not None and getattr(meta, "device", None) is not None:
        replace = meta._replace if hasattr(meta, "_replace") else functools.partial(dataclasses.replace, meta)
        ctx = {**ctx, "tensor_meta": replace(device=device)}
    return type(tensor).__tensor_unflatten__(inner, ctx, tensor.size(), tensor.stride())


def copy_tensor(tensor: torch.Tensor, device, non_blocking: bool = False) -> torch.Tensor:
    """`tensor` on `device`; a quantized subclass keeps its compact form (its inner tensors are copied)."""
    device = torch.device(device)
    return _map_inner(tensor, lambda t: t.to(device, non_blocking=non_blocking), device)


def pin_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked host copy (inner tensors pinned for a quantized subclass), for asynchronous copies."""
    return _map_inner(tensor, lambda t: t.pin_memory(), torch.device("cpu"))


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside `tensor`, in `_map_inner`'s order."""
    out = []
    _map_inner(tensor, lambda t: (out.append(t), t)[1])
    return out


class SwapSlots:
    """GPU buffers that quantized swapped blocks are copied into, allocated once and reused in turn.

    Copies into fresh allocations made on the side stream fragment memory: the caching allocator keeps a pool per
    stream, so freed block copies could not serve the compute stream (an H200 run of int8 blocks:34 under a 12 GB
    budget ran out with 4.4 GiB reserved but unused). Fixed buffers make the swap's GPU memory exactly
    `count` blocks. A slot is refilled only after the compute stream finished the block that used it (an event)."""

    def __init__(self, leaves: list[torch.Tensor], count: int, device: torch.device):
        self.buffers = [[torch.empty(t.shape, dtype=t.dtype, device=device) for t in leaves] for _ in range(count)]
        self.released = [None] * count  # compute-stream event after the last block that read the slot
        self.turn = 0

    @staticmethod
    def signature(leaves: list[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in leaves)

    def take(self) -> int:
        slot, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        return slot


class CompactBlockGroup:
    """The weights of one quantized block: pinned host copies, and views of a GPU slot while the block runs.

    `onload_()` copies every parameter and buffer of the block into the next free slot (on the side stream when there
    is one) and points the block at it; `offload_()` points the block back at its host copies and marks the slot
    free once the compute stream is done with it. Same interface as diffusers' `ModuleGroup` where the rest of this
    module uses it (`modules`, `onload_`, `offload_`)."""

    def __init__(self, block: torch.nn.Module, onload: torch.device, stream, pin: bool):
        self.modules = [block]
        self.parameters, self.buffers = [], []
        self.onload_leader = self.offload_leader = block
        self.onload_self = False
        self.onload_device, self.stream = onload, stream
        self.entries = []  # (module, "_parameters" | "_buffers", name, host tensor)
        for module in block.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    host = copy_tensor(tensor.detach(), "cpu")
                    host = pin_tensor(host) if pin else host
                    if kind == "_parameters":  # made once here: a Parameter cannot be made in inference mode
                        host = torch.nn.Parameter(host, requires_grad=False)
                    self.entries.append((module, kind, name, host))
        self.leaves = [leaf for *_, host in self.entries for leaf in _leaves(host)]
        self.slots: SwapSlots | None = None  # shared with the other groups of the same layout (`apply_block_swap`)
        self.slot = None
        self.event = None
        self.offload_()

    def onload_(self) -> None:
        if self.slot is not None:
            return
        self.slot = self.slots.take()
        buffers = self.slots.buffers[self.slot]
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            if self.stream is not None and self.slots.released[self.slot] is not None:
                self.stream.wait_event(self.slots.released[self.slot])
            for dst, src in zip(buffers, self.leaves, strict=True):
                dst.copy_(src, non_blocking=self.stream is not None)
            if self.stream is not None:
                self.event = self.stream.record_event()
        views = iter(buffers)
        for module, kind, name, host in self.entries:
            # the layers only read these: plain tensors (or quantized wrappers) around the slot's buffers
            getattr(module, kind)[name] = _map_inner(host, lambda _: next(views), self.onload_device)

    def wait(self) -> None:
        """Make the compute stream wait for this block's copy."""
        if self.event is not None:
            torch.cuda.current_stream(self.onload_device).wait_event(self.event)
            self.event = None

    def offload_(self) -> None:
        for module, kind, name, host in self.entries:
            getattr(module, kind)[name] = host
        if self.slot is not None and self.stream is not None:
            self.slots.released[self.slot] = torch.cuda.current_stream(self.onload_device).record_event()
        self.slot = None


class CompactBlockSwap(ModelHook):
    """On a quantized swapped block: its weights onto the GPU before it runs (unless prefetched), back to the host
    copies after."""

    def __init__(self, group: CompactBlockGroup):
        super().__init__()
        self.group = group

    def pre_forward(self, module, *args, **kwargs):
        self.group.onload_()
        self.group.wait()
        return args, kwargs

    def post_forward(self, module, output):
        self.group.offload_()
        return output


def _has_quantized_weights(block: torch.nn.Module) -> bool:
    return any(is_quantized_tensor(p) for p in block.parameters())


def apply_block_swap(model: torch.nn.Module, n: int, onload_device, offload_device="cpu",
                     use_stream: bool | None = None, prefetch: bool | None = None, swap: str | None = None) -> dict:
    """Keep `n` of `model.blocks` in (pinned, with a stream) host memory; the rest of the model goes to
    `onload_device`. `use_stream` defaults to True on CUDA; `prefetch` (copy a block while the previous module runs)
    defaults to `use_stream` — without a stream an early copy only holds memory sooner. `swap`: the plan's mechanism
    (`Offload.swap`: "compact" for quantized weights, "diffusers" for plain ones); None (direct callers: tests,
    benchmarks) takes each block's own form. Returns a report."""
    onload, offload = torch.device(onload_device), torch.device(offload_device)
    use_stream = onload.type == "cuda" if use_stream is None else use_stream
    prefetch = use_stream if prefetch is None else prefetch
    blocks = model.blocks
    swapped = swapped_block_indices(len(blocks), n)
    _move_resident(model, onload, set(swapped))
    stream = torch.cuda.Stream(onload) if use_stream else None
    groups: dict[int, ModuleGroup | CompactBlockGroup] = {}
    for i in swapped:
        block = blocks[i]
        quantized = _has_quantized_weights(block)
        if swap == "diffusers" and quantized:
            raise InfiniteTalkError(f"block {i} holds quantized weights but the plan swaps plain ones (diffusers): "
                                    "the plan's quantization and the loaded weights disagree")
        if swap == "compact" or (swap is None and quantized):
            groups[i] = CompactBlockGroup(block, onload, stream, pin=use_stream)
            _registry(block).register_hook(CompactBlockSwap(groups[i]), _COMPACT_SWAP)
            continue
        # building the group pins a host copy of this block (with a stream); registering the hook offloads it,
        # so host memory holds one extra block at a time while this runs
        groups[i] = add_block_group(block, onload, offload, stream, onload_self=not prefetch, group_id=f"blocks.{i}")
    _share_slots([g for g in groups.values() if isinstance(g, CompactBlockGroup)], onload, len(blocks), swapped)
    if prefetch:
        for i, group in groups.items():
            if i - 1 in groups and isinstance(groups[i - 1], ModuleGroup) and isinstance(group, ModuleGroup):
                # the previous block is swapped too: its hook starts this copy (diffusers' chain)
                chain_block_groups(blocks[i - 1], group)
            else:  # a resident (or compact-swapped) block, or the model itself for block 0, starts it
                trigger = blocks[i - 1] if i > 0 else model
                _registry(trigger).register_hook(Prefetch(group), _PREFETCH)
    per_block = [_group_bytes(groups[i]) for i in swapped]
    compact = sum(isinstance(g, CompactBlockGroup) for g in groups.values())
    return {"offload": f"blocks:{n}", "swapped_blocks": swapped, "swapped_bytes": sum(per_block),
            "mechanism": "diffusers ModuleGroup" if not compact else "compact (quantized tensors)" if
            compact == len(groups) else f"compact for {compact} quantized blocks, diffusers for the rest",
            "stream": use_stream, "prefetch": prefetch, "pinned": use_stream,
            "blocks_in_flight": blocks_in_flight(len(blocks), n)}


def _share_slots(groups: list[CompactBlockGroup], device: torch.device, num_blocks: int, swapped: list[int]) -> None:
    """One set of GPU slots per block layout, as many as blocks can be in flight at once."""
    count = blocks_in_flight(num_blocks, len(swapped))
    pools: dict[tuple, SwapSlots] = {}
    for group in groups:
        key = SwapSlots.signature(group.leaves)
        if key not in pools:
            pools[key] = SwapSlots(group.leaves, count, device)
        group.slots = pools[key]


def apply_sequential(model: torch.nn.Module, onload_device, offload_device="cpu", use_stream: bool | None = None,
                     low_cpu_mem_usage: bool = False) -> dict:
    """diffusers leaf-level group offloading of the whole model (every Linear/Conv/Embedding and the parameters
    outside them visit the GPU only while their module runs). `low_cpu_mem_usage` pins each layer when it is copied
    instead of keeping a pinned copy (slower copies, no page-locked host memory)."""
    onload = torch.device(onload_device)
    use_stream = onload.type == "cuda" if use_stream is None else use_stream
    apply_group_offloading(model, onload_device=onload, offload_device=torch.device(offload_device),
                           offload_type="leaf_level", use_stream=use_stream, record_stream=False,
                           low_cpu_mem_usage=low_cpu_mem_usage)
    return {"offload": "sequential", "groups": len(offloaded_groups(model)), "stream": use_stream,
            "pinned": use_stream}


def apply_offload(model: torch.nn.Module, offload: Offload, device) -> dict:
    """Apply the plan's setting (`Offload`: none, blocks:N, sequential) to the transformer; `none` moves it to
    `device`."""
    device = torch.device(device)
    if offload.kind == "none":
        move_module(model, device)
        return {"offload": "none"}
    if device.type != "cuda":
        raise OptionError(f"offload={offload}: offload moves weights between GPU and host; this run uses "
                          f"device={device.type}", option="offload", value=str(offload))
    if offload.kind == "blocks":
        return apply_block_swap(model, offload.blocks, device, swap=offload.swap)
    return apply_sequential(model, device)


def offload_after_use(model: torch.nn.Module, onload_device, offload_device="cpu") -> None:
    """Keep `model` in host memory; each forward moves it to `onload_device` and back afterwards (one model-level
    group, synchronous copies: an encoder runs a few times per video)."""
    add_model_group(model, torch.device(onload_device), torch.device(offload_device))


def offloaded_groups(model: torch.nn.Module) -> dict[str, ModuleGroup]:
    """Module name -> the weight group its offloading hook moves (groups that hold weights only)."""
    out = {}
    for name, module in model.named_modules():
        hook = group_offloading_hook(module) or group_offloading_hook(module, _COMPACT_SWAP)
        if hook is not None and (hook.group.modules or hook.group.parameters or hook.group.buffers):
            out[name] = hook.group
    return out


def offloaded_blocks(model: torch.nn.Module) -> list[int]:
    """Indices of the transformer blocks that live in host memory."""
    return sorted(int(name.split(".")[1]) for name in offloaded_groups(model) if re.fullmatch(r"blocks\.\d+", name))


def release(model: torch.nn.Module) -> None:
    """Put every offloaded group back in host memory (after a failed forward left some on the GPU)."""
    for group in offloaded_groups(model).values():
        if group.onload_leader is not None and group.offload_leader is not None:
            group.offload_()


def remove_offload(model: torch.nn.Module) -> None:
    """Drop all offloading hooks; the weights stay where they are (host or GPU). For switching settings in one
    process (the memory benchmark)."""
    release(model)
    remove_group_offloading_hooks(model)
    registry = _registry(model)
    registry.remove_hook(_PREFETCH, recurse=True)
    registry.remove_hook(_COMPACT_SWAP, recurse=True)


def _group_bytes(group: ModuleGroup) -> int:
    return sum(weight_bytes(m) for m in group.modules)
