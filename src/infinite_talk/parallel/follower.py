"""A process other than rank 0 in a torchrun job: it loads only the transformer and runs the forwards rank 0 sends.

It writes nothing. Any failure is one `error: process R of N: ...` line on stderr and a non-zero exit (torchrun then
stops the job; rank 0 keeps its finished chunks); rank 0 stopping the job ends it with exit 0.
"""

from __future__ import annotations

import sys

from ..errors import InfiniteTalkError
from .launch import World, stop_group


def run_follower(load_options, world: World, debug: bool = False, dry_run: bool = False) -> int:
    """Exit code of the follower process; `load_options()` builds the LoadOptions (as on every process)."""
    try:
        options = load_options()
        if not dry_run:
            _follow(options, world)
            stop_group()  # only after a clean stop: after a failure the group may wait for the processes that left
        return 0
    except InfiniteTalkError as err:
        print(f"error: {world.label()}: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"error: {world.label()}: internal error: {type(err).__name__}: {err} (run with --debug for details "
              "and report it)", file=sys.stderr, flush=True)
        return 1


def _follow(options, world: World) -> None:
    import torch

    from ..model_files import resolve_model_files
    from ..pipeline import _refuse_double_quantization, load_planned_transformer
    from ..plan.planner import resolve
    from ..plan.probe import probe
    from .launch import bind_device, start_group
    from .peers import follow, wait_for_files

    options.validate()
    bind_device(world)
    plan = resolve(options, probe(), world)
    parallel = start_group(world, plan)
    if not wait_for_files():  # rank 0 stopped the job before loading (its error is on its stderr)
        return
    files, geometry = resolve_model_files(options, lambda msg: None)
    _refuse_double_quantization(plan, files)
    transformer, *_ = load_planned_transformer(plan, options, files, geometry, lambda msg: None, parallel)
    follow(transformer, torch.device(plan.device))
