"""Step caches: skip the 40 transformer blocks on steps whose input barely changed, reusing the last residual.

Two kinds, both keyed by guidance pass so that passes never share state (the reference's TeaCache lives on the class
and assigns branches by a forward counter `cnt % 3`, which breaks with 2 passes: docs/REFERENCE.md D2, MeiGen#87):

* `teacache` — reference TeaCache (docs/REFERENCE.md §3.6, `use_ret_steps` mode). Per pass: the relative L1 change of
  the time-projection output e0 since that pass's previous call, rescaled by the reference polynomial for the 480 or
  720 tier, is accumulated; while the sum stays below the threshold the blocks are skipped and the pass's cached
  residual (blocks output − blocks input) is added instead; otherwise the blocks run and the sum restarts at 0. The
  first 5 steps of every pass always run. Unlike the reference, a negative polynomial value (the 720 fit goes below
  0 near rel = 0) adds nothing, so threshold 0 never skips.
* `firstblock` — diffusers' FirstBlockCache: block 0 always runs; when its residual changed by less than the
  threshold (relative mean abs) since the pass's last full run, the remaining blocks are skipped.

Both are diffusers hooks (`diffusers.hooks.HookRegistry`) whose state is kept per `transformer.cache_context(name)`;
the loop calls every pass inside the context named after it, and `start_chunk()` drops all state (each chunk starts
from fresh noise). The number of skipped forwards is counted per chunk and per pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook

from ..errors import OptionError
from ..models.diffusers_adapter import (
    BaseState,
    StateManager,
    first_block_cache_skip_reader,
    register_block_returning_hidden_states,
)

KINDS = ("off", "teacache", "firstblock")
DEFAULT_THRESHOLD = {"teacache": 0.2, "firstblock": 0.05}
# docs/REFERENCE.md §3.6: `use_ret_steps` rescaling polynomials of the e0 distance (highest degree first), by tier.
TEACACHE_COEFFICIENTS = {
    480: (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    720: (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
TEACACHE_WARMUP_STEPS = 5  # reference ret_steps = 15 forwards = 5 steps x 3 passes: always computed
_TEA_DECISION = "infinite_talk_teacache_decision"
_TEA_BLOCK = "infinite_talk_teacache_block"


@dataclass(frozen=True)
class StepCachePlan:
    """What the step cache will do for a request (plan display and sidecar)."""

    kind: str
    threshold: float
    detail: str
    may_skip: bool  # False when no step can be skipped (e.g. TeaCache with <= 5 steps)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "detail": self.detail, "may_skip": self.may_skip}


def describe(kind: str, threshold: float | None, size: int, steps: int) -> StepCachePlan | None:
    """The plan of a step cache (None for `off`). Raises OptionError for unknown kinds."""
    if kind not in KINDS:
        raise OptionError(f"step_cache: unknown value {kind!r}; choose one of: {', '.join(KINDS)}",
                          option="step_cache", value=kind)
    if kind == "off":
        return None
    value = DEFAULT_THRESHOLD[kind] if threshold is None else float(threshold)
    if kind == "teacache":
        tier = 480 if size <= 480 else 720
        may_skip = steps > TEACACHE_WARMUP_STEPS and value > 0
        detail = (f"TeaCache on e0 with the reference {tier}p coefficients, per-pass state, the first "
                  f"{TEACACHE_WARMUP_STEPS} steps of each pass always computed")
        if steps <= TEACACHE_WARMUP_STEPS:
            detail += f"; with {steps} steps nothing can be skipped"
        return StepCachePlan(kind, value, detail, may_skip)
    detail = "diffusers FirstBlockCache: block 0 always runs; per-pass state"
    return StepCachePlan(kind, value, detail, value > 0 and steps > 1)


# ---- TeaCache as diffusers hooks ------------------------------------------------------------------------------------
class _TeaCacheState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.previous_e0: torch.Tensor | None = None
        self.accumulated = 0.0
        self.residual: torch.Tensor | None = None
        self.block_input: torch.Tensor | None = None
        self.skip = False


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class _TeaCacheDecisionHook(ModelHook):
    """On the time projection: decides from its output e0 whether this pass skips the blocks."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, threshold: float, coefficients: tuple[float, ...]):
        super().__init__()
        self.state_manager = state_manager
        self.threshold = threshold
        self.coefficients = coefficients

    def post_forward(self, module, output):
        state: _TeaCacheState = self.state_manager.get_state()
        step = self.state_manager.context.step_index
        e0 = output.detach().float()
        skip = False
        if state.residual is not None and state.previous_e0 is not None and step is not None \
                and step >= TEACACHE_WARMUP_STEPS:
            previous = state.previous_e0
            rel = ((e0 - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
            state.accumulated += max(0.0, _poly(self.coefficients, rel))
            skip = state.accumulated < self.threshold
        if not skip:
            state.accumulated = 0.0
        state.previous_e0 = e0
        state.skip = skip
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _TeaCacheBlockHook(ModelHook):
    """On each block: pass through when skipping (the head adds the cached residual); record the residual."""

    def __init__(self, state_manager: StateManager, is_head: bool, is_tail: bool):
        super().__init__()
        self.state_manager = state_manager
        self.is_head = is_head
        self.is_tail = is_tail

    def new_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state: _TeaCacheState = self.state_manager.get_state()
        if state.skip:
            return hidden + state.residual if self.is_head else hidden
        if self.is_head:
            state.block_input = hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            state.residual = output - state.block_input
            state.block_input = None
        return output


# ---- the object the loop uses ----------------------------------------------------------------------------------------
class StepCache:
    """A step cache installed on one transformer for one generation. Use `start_chunk()` before each chunk and
    `call(pass_name, step, steps, fn)` around every model call; `remove()` when done."""

    def __init__(self, transformer, kind: str, threshold: float | None = None, size: int = 480):
        if kind not in KINDS or kind == "off":
            raise OptionError(f"step_cache: {kind!r} is not a cache; choose one of: teacache, firstblock",
                              option="step_cache", value=kind)
        self.transformer = transformer
        self.kind = kind
        self.threshold = DEFAULT_THRESHOLD[kind] if threshold is None else float(threshold)
        self.tier = 480 if size <= 480 else 720
        self.installed = False
        self.skipped_this_chunk = 0
        self.skipped_by_pass: Counter[str] = Counter()
        self._read_skip: Callable[[], bool] | None = None

    # install / remove
    def install(self) -> None:
        if self.installed:
            return
        blocks = list(self.transformer.blocks)
        if not blocks:
            raise OptionError("step cache: the transformer has no blocks to skip")
        if self.kind == "teacache":
            manager = StateManager(_TeaCacheState)
            decision = _TeaCacheDecisionHook(manager, self.threshold, TEACACHE_COEFFICIENTS[self.tier])
            HookRegistry.check_if_exists_or_initialize(self.transformer.condition_embedder.time_proj) \
                .register_hook(decision, _TEA_DECISION)
            for i, block in enumerate(blocks):
                hook = _TeaCacheBlockHook(manager, is_head=i == 0, is_tail=i == len(blocks) - 1)
                HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _TEA_BLOCK)
            self._read_skip = lambda: manager.get_state().skip
        else:
            # FirstBlockCache finds a block's output through diffusers' block registry; our block subclass returns
            # the hidden states alone, like diffusers' Wan block
            register_block_returning_hidden_states(type(blocks[0]))
            if len(blocks) < 2:
                raise OptionError("step_cache=firstblock needs a transformer with at least 2 blocks")
            self.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
            self._read_skip = first_block_cache_skip_reader(blocks[0])
        self._root().invalidate_child_registries_cache()
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        if self.kind == "teacache":
            HookRegistry.check_if_exists_or_initialize(self.transformer.condition_embedder.time_proj) \
                .remove_hook(_TEA_DECISION, recurse=False)
            for block in self.transformer.blocks:
                HookRegistry.check_if_exists_or_initialize(block).remove_hook(_TEA_BLOCK, recurse=False)
        else:
            self.transformer.disable_cache()
        self._root().invalidate_child_registries_cache()
        self.installed = False
        self._read_skip = None

    def _root(self) -> HookRegistry:
        return HookRegistry.check_if_exists_or_initialize(self.transformer)

    # per chunk / per call
    def start_chunk(self) -> None:
        """Fresh state for every pass (a chunk starts from new noise) and a zero skip count."""
        self.install()
        self._root().reset_stateful_hooks(recurse=True)
        self.skipped_this_chunk = 0

    def call(self, pass_name: str, step: int, steps: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one model call as pass `pass_name` at `step` of `steps`; counts it if the blocks were skipped."""
        with self.transformer.cache_context(pass_name, step_index=step, num_inference_steps=steps):
            output = fn()
            skipped = self._read_skip()
        if skipped:
            self.skipped_this_chunk += 1
            self.skipped_by_pass[pass_name] += 1
        return output


def make_step_cache(transformer, kind: str, threshold: float | None, size: int) -> StepCache | None:
    """The cache for a request (None for `off`)."""
    describe(kind, threshold, size, steps=1)  # validates the kind
    return None if kind == "off" else StepCache(transformer, kind, threshold, size)
