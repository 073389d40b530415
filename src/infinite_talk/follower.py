"""A process other than rank 0 in a torchrun job: it loads only the transformer and runs the forwards rank 0 sends.

The same loop serves `generate` (one job) and `serve` (job after job, until the service stops). It writes nothing.
Any failure is one `error: process R of N: ...` line on stderr and a non-zero exit (torchrun then stops the job; rank
0 keeps its finished chunks); rank 0 stopping the job ends it with exit 0. SIGTERM / SIGINT (torchrun passes its own
to every process) do not end it by themselves: rank 0 gets them too and says stop at the next step, after the
transformer call in flight (stopping here first would break rank 0's job off mid-step).
"""

from __future__ import annotations

import gc
import signal
import sys

import torch

from .errors import InfiniteTalkError
from .loading import load_planned_transformer, refuse_double_quantization, resolve_model_files
from .options import LoadOptions, from_dict
from .parallel.launch import PeerError, World, bind_device, start_group, stop_group
from .parallel.peers import follow
from .plan.planner import resolve
from .plan.probe import probe


def run_follower(load_options, world: World, debug: bool = False, dry_run: bool = False) -> int:
    """Exit code of the follower process; `load_options()` builds the LoadOptions (as on every process)."""
    signalled: list[int] = []
    try:
        options = load_options()
        if not dry_run:
            _follow(options, world, signalled)
            stop_group(leader=False)  # only after a clean stop: after a failure the group may wait for the
            # processes that left
        return 0
    except PeerError as err:
        if signalled:  # told to stop, and rank 0 went first without a word: the launcher is ending the job
            print(f"{world.label()}: stopped by signal {signalled[0]} ({err})", file=sys.stderr, flush=True)
            return 0
        print(f"error: {world.label()}: {err}", file=sys.stderr, flush=True)
        return 2
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


def _follow(options, world: World, signalled: list[int]) -> None:
    options.validate()
    bind_device(world)
    plan = resolve(options, probe(), world)
    parallel = start_group(world, plan)
    for sig in (signal.SIGTERM, signal.SIGINT):  # noted; rank 0's stop ends this process (see above)
        signal.signal(sig, lambda signum, frame: signalled.append(signum))
    follow(None, torch.device(plan.device), _Loader(world, parallel))


class _Loader:
    """The transformer for rank 0's LoadOptions (a dict in its `load` message), loaded again only when they change."""

    def __init__(self, world: World, parallel):
        self.world, self.parallel = world, parallel
        self.options = self.loaded = None

    def __call__(self, wanted: dict):
        options = from_dict(LoadOptions, wanted)
        if options == self.options:
            return self.loaded
        self.options = self.loaded = None  # the old weights go before the new ones come
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        plan = resolve(options, probe(), self.world)
        if (plan.ulysses, plan.ring) != (self.parallel.ulysses, self.parallel.ring):  # rank 0 refuses this first
            raise PeerError(f"the processes are split as {self.parallel.describe()}; rank 0 asked for ulysses "
                            f"{plan.ulysses} × ring {plan.ring}")
        files, geometry = resolve_model_files(options, lambda msg: None)
        refuse_double_quantization(plan, files)
        transformer, *_ = load_planned_transformer(plan, options, files, geometry, lambda msg: None, self.parallel)
        self.options, self.loaded = options, (transformer, torch.device(plan.device))
        return self.loaded
