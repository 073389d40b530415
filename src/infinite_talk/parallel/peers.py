"""Rank 0 and the other processes of a sequence-parallel job: who runs what, and the messages between them.

Rank 0 runs the whole pipeline (encoders, VAE, chunk loop, mp4 writer, sidecar). The other processes ("followers")
hold only the transformer and wait for rank 0's messages, each a broadcast from rank 0:

* `load`    — rank 0 found the model files (it writes the tiny preset / downloads first); the message carries the
  LoadOptions rank 0 loads with (a dict): followers load their transformer, and load it again when a later `load`
  names other options (a pipeline loaded again);
* `forward` — one transformer call: its inputs follow as tensor broadcasts, then every process runs the same
  sequence-parallel forward (rank 0 keeps the gathered output). The message carries the step-cache context
  (kind, chunk, guidance pass, step), so a follower's TeaCache decides exactly as rank 0's;
* `end`     — one generation is over (finished, cancelled or failed between forwards): followers drop its step-cache
  state and wait for the next (the job service runs job after job);
* `idle`    — nothing to do (the job service's queue is empty), sent every `KEEPALIVE_S`: a follower's wait never
  reaches the process group's timeout;
* `stop`    — rank 0 is done (the job is over, the service stops, or rank 0 failed between forwards): followers
  exit 0.

A failure inside a forward leaves the collectives out of step: rank 0 then sends nothing more, ends its job as failed
(finished chunks kept) and exits non-zero, and the launcher stops the others.
"""

from __future__ import annotations

import re
import time

import torch
import torch.distributed as dist

from ..errors import OptionError
from .launch import PeerError, World

# A step cache that decides per process from its own slice of tokens would make the processes disagree.
SAFE_STEP_CACHES = ("off", "teacache")
KEEPALIVE_S = 60.0  # an idle job service's message to its followers (the group's timeout is GROUP_TIMEOUT)


def _broadcast(message: dict | None) -> dict:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _short(err: BaseException) -> str:
    """gloo/NCCL's message without its source location and advice: 'Connection closed by peer [host]:port'."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(err).strip())
    return text.split(". ")[0]


def _is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another process left (gloo/NCCL errors), not a bug in this process."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL"))


class Leader:
    """Rank 0's side of the job."""

    def __init__(self, world: World, parallel):
        self.world = world
        self.parallel = parallel  # sequence.SequenceParallel
        self.in_forward = False  # a failure now leaves the collectives out of step: no more messages
        self.closed = False
        self.run = 0
        self.last_sent = time.monotonic()

    def describe(self) -> str:
        return f"{self.parallel.describe()} ({dist.get_backend()})"

    @property
    def in_step(self) -> bool:
        """The processes can still exchange messages (no forward broke off, none of them left)."""
        return not self.closed and not self.in_forward

    def files_ready(self, options: dict) -> None:
        """The model files are in place: the followers load their transformer with `options` (LoadOptions as a
        dict), or keep the one they hold when it was loaded with the same options."""
        self._send({"op": "load", "options": options})

    def check_request(self, request) -> None:
        """Refuse what the processes cannot do together (before any forward)."""
        if request.step_cache not in SAFE_STEP_CACHES:
            raise OptionError(f"step_cache={request.step_cache}: decides from the first block's output, which each "
                              f"process of a sequence-parallel job ({self.parallel.describe()}) sees only a slice "
                              "of, so they would disagree on skipping; use --step-cache teacache (decides from the "
                              "timestep, the same everywhere) or off", option="step_cache",
                              value=request.step_cache)

    def start_run(self) -> None:
        self.run += 1

    def end_run(self) -> bool:
        """Tell the followers that this generation is over (they wait for the next); False when the processes are
        out of step (a forward broke off, or a process left): no generation can run on them any more."""
        if not self.in_step:
            return False
        try:
            self._send({"op": "end", "run": self.run})
        except PeerError:
            return False
        return True

    def keep_alive(self) -> None:
        """An idle leader's sign of life, at most every `KEEPALIVE_S` (raises `PeerError` when a follower left)."""
        if self.in_step and time.monotonic() - self.last_sent >= KEEPALIVE_S:
            self._send({"op": "idle"})

    def forward(self, fn, args: tuple, *, step_cache, chunk: int, pass_name: str, step: int, steps: int):
        """Send one transformer call (`fn()` on `args`) to the followers, then run it here."""
        latent = args[0]
        self.parallel.check_tokens(latent.shape[2] * (latent.shape[3] // 2) * (latent.shape[4] // 2))
        cache = None if step_cache is None else (step_cache.kind, step_cache.threshold, step_cache.tier)
        specs = [None if a is None else (tuple(a.shape), str(a.dtype).removeprefix("torch.")) for a in args]
        message = {"op": "forward", "run": self.run, "chunk": chunk, "pass": pass_name, "step": step,
                   "steps": steps, "cache": cache, "args": specs}
        if self.closed:
            raise PeerError("the other processes of this job have stopped")
        self.in_forward = True
        try:
            self._send(message)
            for a in args:
                if a is not None:
                    dist.broadcast(a.contiguous(), src=0)
            out = fn()
        except Exception as err:
            if _is_peer_failure(err):
                raise PeerError(f"another process of the job stopped during a transformer forward ({_short(err)}); its "
                                "message is printed by that process") from err
            raise
        self.in_forward = False
        return out

    def close(self) -> bool:
        """Tell the followers the job is over; False when that was not possible (a forward broke off, or they are
        gone): the launcher stops them, and the group must not wait for them."""
        if self.closed or self.in_forward:
            return False
        self.closed = True
        try:
            self._send({"op": "stop"})
        except Exception:  # they are gone already; nothing left to tell
            return False
        return True

    def _send(self, message: dict) -> None:
        self.last_sent = time.monotonic()
        try:
            _broadcast(message)
        except Exception as err:
            if _is_peer_failure(err):
                self.closed = True
                raise PeerError(f"another process of the job has stopped ({_short(err)}); its message is printed by that "
                                "process") from err
            raise


def _receive() -> dict:
    try:
        return _broadcast(None)
    except Exception as err:
        if _is_peer_failure(err):
            raise PeerError(f"rank 0 left the job ({_short(err)})") from err
        raise


def follow(transformer, device: torch.device, load=None) -> int:
    """Follower: run every transformer call rank 0 sends until it says stop; returns the number of forwards.

    `load(options: dict)` → (transformer, device) answers rank 0's `load` messages (the first one, and one that
    names other options); without it the given `transformer` runs every call."""
    from ..sampling.step_cache import StepCache

    cache, cache_key, chunk_key, forwards = None, None, None, 0
    try:
        while True:
            message = _receive()
            op = message["op"]
            if op == "stop":
                return forwards
            if op in ("end", "load"):  # a generation is over / new weights: no step-cache state carries over
                if cache is not None:
                    cache.remove()
                cache, cache_key, chunk_key = None, None, None
                if op == "load":
                    if load is None:
                        raise PeerError("rank 0 sent a load message to a process that holds a fixed transformer")
                    transformer = None  # the old weights go before the new ones come
                    transformer, device = load(message["options"])
                continue
            if op == "idle":
                continue
            if op != "forward":
                raise PeerError(f"unexpected message from rank 0: {op}")
            if transformer is None:
                raise PeerError("rank 0 sent a transformer call before loading the models")
            args = []
            for spec in message["args"]:
                if spec is None:
                    args.append(None)
                    continue
                shape, dtype = spec
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                try:
                    dist.broadcast(tensor, src=0)
                except Exception as err:
                    raise PeerError(f"rank 0 left the job during a transformer call ({_short(err)})") from err
                args.append(tensor)
            key = (message["run"], message["cache"])
            if key != cache_key:  # a new generation (or a different cache): fresh hooks, as on rank 0
                if cache is not None:
                    cache.remove()
                cache = None if message["cache"] is None else StepCache(transformer, message["cache"][0],
                                                                        message["cache"][1], message["cache"][2])
                cache_key, chunk_key = key, None
            if cache is not None and (message["run"], message["chunk"]) != chunk_key:
                cache.start_chunk()
                chunk_key = (message["run"], message["chunk"])

            def call(args=tuple(args), transformer=transformer):
                return transformer(*args)

            try:
                with torch.inference_mode():
                    if cache is None:
                        call()
                    else:
                        cache.call(message["pass"], message["step"], message["steps"], call)
            except Exception as err:
                if _is_peer_failure(err):
                    raise PeerError(f"the job stopped during a transformer forward ({_short(err)})") from err
                raise
            forwards += 1
    finally:
        if cache is not None:
            cache.remove()
