"""The one module that reaches into diffusers' private internals; everything else imports diffusers' public API or this.

Each item below was checked against diffusers 0.42.1 (pyproject.toml allows >=0.42.1,<0.43) and says what it does
and what of diffusers it relies on, so that a diffusers upgrade is one file to re-check. The tests that exercise each
item: test_parallel.py (context parallel), test_step_cache.py (hooks state, FirstBlockCache), test_offload.py
(group offloading), test_gguf.py (GGUF linears).
"""

from __future__ import annotations

import torch
from diffusers import ParallelConfig
from diffusers.hooks import HookRegistry
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.group_offloading import (
    _GROUP_OFFLOADING,
    _LAYER_EXECUTION_TRACKER,
    _LAZY_PREFETCH_GROUP_OFFLOADING,
    GroupOffloadingConfig,
    GroupOffloadingHook,
    GroupOffloadingType,
    ModuleGroup,
)
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _templated_context_parallel_attention,
)

__all__ = [
    "BaseState", "GROUP_OFFLOADING_HOOK", "ModuleGroup", "StateManager", "active_attention_backend",
    "add_block_group", "add_model_group", "backend_supports_context_parallel", "chain_block_groups",
    "context_parallel_attention", "context_parallel_group", "first_block_cache_skip_reader", "group_offloading_hook",
    "processor_attention_backend", "register_block_returning_hidden_states", "remove_group_offloading_hooks",
    "replace_with_gguf_linear", "set_processor_attention_backend", "set_processor_parallel_config",
]


# ---- context-parallel attention (models/transformer.py, parallel/sequence.py) ---------------------------------------
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               forward_op, parallel_config: ParallelConfig) -> torch.Tensor:
    """diffusers' Ulysses / ring attention (all-to-all over heads, ring over key/value blocks) around our own local
    attention op `forward_op` (diffusers' forward-op signature). 0.42.1: `attention_dispatch.
    _templated_context_parallel_attention(q, k, v, attn_mask=..., forward_op=..., backward_op=...,
    _parallel_config=...)`; `dispatch_attention_fn` reaches it only for diffusers' registered backends, not ours."""
    return _templated_context_parallel_attention(q, k, v, attn_mask=mask, forward_op=forward_op, backward_op=None,
                                                 _parallel_config=parallel_config)


def backend_supports_context_parallel(name: AttentionBackendName) -> bool:
    """Whether diffusers' dispatcher runs context-parallel attention itself for this backend. 0.42.1:
    `_AttentionBackendRegistry._is_context_parallel_available(name)` (registered with `supports_context_parallel`)."""
    return _AttentionBackendRegistry._is_context_parallel_available(name)


def active_attention_backend() -> str:
    """The dispatcher's default backend name (the one used when a processor has none set). 0.42.1:
    `_AttentionBackendRegistry.get_active_backend()` returns (AttentionBackendName, function)."""
    return _AttentionBackendRegistry.get_active_backend()[0].value


def context_parallel_group(config: ParallelConfig):
    """The process group spanning the whole (ring x ulysses) mesh of a set-up `ParallelConfig`. 0.42.1:
    `ContextParallelConfig.setup` keeps the flattened mesh in `_flattened_mesh`."""
    return config.context_parallel_config._flattened_mesh.get_group()


def processor_attention_backend(processor):
    """The backend a processor dispatches to (None: the dispatcher's default). 0.42.1: `ModelMixin.
    set_attention_backend` writes it to each processor's `_attention_backend`, which the processors pass on."""
    return getattr(processor, "_attention_backend", None)


def set_processor_attention_backend(processor, name: AttentionBackendName) -> None:
    """Set one processor's backend without `set_attention_backend`'s availability check (the memory tracer runs on
    the meta device, where the kernels need not be installed). 0.42.1: the `_attention_backend` attribute."""
    processor._attention_backend = name


def set_processor_parallel_config(processor, config: ParallelConfig | None) -> None:
    """Give one attention processor the context-parallel config it passes to the dispatcher. 0.42.1:
    `ModelMixin.enable_parallelism` writes `_parallel_config` on each processor."""
    processor._parallel_config = config


# ---- hook state and FirstBlockCache (sampling/step_cache.py) ---------------------------------------------------------
# `BaseState` / `StateManager` (re-exported): per-`cache_context` state of a stateful hook. 0.42.1: defined in
# `diffusers.hooks.hooks`, not exported by `diffusers.hooks`; StateManager(state_cls).get_state(), .reset(),
# .context.step_index (set by `cache_context(..., step_index=...)`).


def first_block_cache_skip_reader(first_block: torch.nn.Module):
    """A function telling whether FirstBlockCache skipped the remaining blocks in the current call. 0.42.1: the
    leader hook on block 0 is registered as `first_block_cache._FBC_LEADER_BLOCK_HOOK`; its state's
    `should_compute` is False when the cached residual was used."""
    leader = HookRegistry.check_if_exists_or_initialize(first_block).get_hook(_FBC_LEADER_BLOCK_HOOK)
    return lambda: not leader.state_manager.get_state().should_compute


def register_block_returning_hidden_states(block_class: type) -> None:
    """Tell FirstBlockCache that `block_class.forward` returns the hidden states alone (as diffusers' Wan block
    does). 0.42.1: `hooks._helpers.TransformerBlockRegistry` maps block classes to `TransformerBlockMetadata`;
    `get` raises ValueError for an unregistered class."""
    try:
        TransformerBlockRegistry.get(block_class)
    except ValueError:
        TransformerBlockRegistry.register(
            block_class, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
        )


# ---- group offloading (models/offload.py) ----------------------------------------------------------------------------
# The hook name diffusers registers group offloading under. 0.42.1: `group_offloading._GROUP_OFFLOADING`.
GROUP_OFFLOADING_HOOK = _GROUP_OFFLOADING


def _registry(module: torch.nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def add_block_group(block: torch.nn.Module, onload: torch.device, offload: torch.device, stream, onload_self: bool,
                    group_id: str) -> ModuleGroup:
    """Keep `block` in host memory (pinned when there is a stream) and copy it in for each forward, with diffusers'
    `ModuleGroup` + `GroupOffloadingHook` (what `apply_group_offloading(offload_type="block_level")` builds, for one
    chosen block instead of every block of a ModuleList). `onload_self=False`: another hook starts the copy
    (prefetch). 0.42.1: ModuleGroup(modules, offload_device, onload_device, offload_leader, onload_leader,
    non_blocking, stream, record_stream, low_cpu_mem_usage, onload_self, group_id) and
    GroupOffloadingHook(group, config=GroupOffloadingConfig(...)); registering the hook offloads the block."""
    use_stream = stream is not None
    group = ModuleGroup([block], offload_device=offload, onload_device=onload, offload_leader=block,
                        onload_leader=block, non_blocking=use_stream, stream=stream, record_stream=False,
                        low_cpu_mem_usage=False, onload_self=onload_self, group_id=group_id)
    config = GroupOffloadingConfig(onload_device=onload, offload_device=offload,
                                   offload_type=GroupOffloadingType.BLOCK_LEVEL, non_blocking=use_stream,
                                   record_stream=False, low_cpu_mem_usage=False, num_blocks_per_group=1,
                                   stream=stream)
    _registry(block).register_hook(GroupOffloadingHook(group, config=config), _GROUP_OFFLOADING)
    return group


def add_model_group(model: torch.nn.Module, onload: torch.device, offload: torch.device) -> ModuleGroup:
    """Keep the whole `model` in host memory and move it to `onload` for each forward and back after (one group,
    synchronous copies). 0.42.1: as `add_block_group`, with the model as its own leader and no stream."""
    group = ModuleGroup([model], offload_device=offload, onload_device=onload, offload_leader=model,
                        onload_leader=model, non_blocking=False, stream=None, record_stream=False,
                        low_cpu_mem_usage=False, onload_self=True, group_id=type(model).__name__)
    config = GroupOffloadingConfig(onload_device=onload, offload_device=offload,
                                   offload_type=GroupOffloadingType.BLOCK_LEVEL, non_blocking=False,
                                   record_stream=False, low_cpu_mem_usage=False, num_blocks_per_group=1)
    _registry(model).register_hook(GroupOffloadingHook(group, config=config), _GROUP_OFFLOADING)
    return group


def chain_block_groups(previous_block: torch.nn.Module, group: ModuleGroup) -> None:
    """When `previous_block` (itself offloaded by `add_block_group`) runs, start copying `group` in. 0.42.1:
    `GroupOffloadingHook.next_group`, the attribute diffusers' block-level prefetch chain sets."""
    _registry(previous_block).get_hook(_GROUP_OFFLOADING).next_group = group


def group_offloading_hook(module: torch.nn.Module, name: str = _GROUP_OFFLOADING):
    """The hook registered on `module` under `name` (diffusers' group offloading by default), or None, without
    giving the module a hook registry. 0.42.1: a module's registry is its `_diffusers_hook` attribute."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(name) if registry is not None else None


def remove_group_offloading_hooks(model: torch.nn.Module) -> None:
    """Remove diffusers' group-offloading hooks from `model` and its submodules, with the helper hooks leaf-level
    offloading adds. 0.42.1: `_GROUP_OFFLOADING`, `_LAYER_EXECUTION_TRACKER`, `_LAZY_PREFETCH_GROUP_OFFLOADING`."""
    registry = _registry(model)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


# ---- GGUF linears (models/transformer_loading.py) --------------------------------------------------------------------
def replace_with_gguf_linear(model: torch.nn.Module, dtype: torch.dtype, placeholders: dict) -> None:
    """Swap the Linear layers named in `placeholders` (state-dict keys -> `GGUFParameter`s carrying the quant type)
    for diffusers' `GGUFLinear`, computing in `dtype`. 0.42.1: `quantizers.gguf.utils._replace_with_gguf_linear(model,
    compute_dtype, state_dict)`."""
    # lazy: diffusers' GGUF utilities import the optional `gguf` package
    from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

    _replace_with_gguf_linear(model, dtype, placeholders)
