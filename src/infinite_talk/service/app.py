"""`infinite-talk serve`: the job service (HTTP API + one worker per GPU) on a data folder.

The model options are those of `generate` (built from the same schema), `--preset tiny` included. The models are
loaded before the server listens, so a refused option or a missing file stops it with one clear line. A token is
required whenever the server listens beyond loopback.

`torchrun --nproc-per-node N -m infinite_talk.cli serve ...`: rank 0 is the service (API, job store, one worker);
its worker runs every job's transformer calls sequence-parallel over all N processes. The other processes serve
no HTTP and write nothing: they follow job after job (parallel/follower.py) until rank 0 stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading

from ..errors import OptionError
from ..options import LoadOptions

TOKEN_ENV = "INFINITE_TALK_TOKEN"
MIN_TOKEN_CHARS = 16
STOP_WAIT_S = 20  # torchrun: the running job's next step, before the launcher's SIGKILL (30 s after its SIGTERM)


def add_cli(subparsers) -> None:
    from ..cli import _add_schema

    parser = subparsers.add_parser("serve", help="HTTP job service: submit jobs, watch them, resume after restarts")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; any other "
                        "address needs a token)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--data-dir", default="infinite-talk-jobs", help="folder of the job database and the jobs' "
                        "files (default: ./infinite-talk-jobs)")
    parser.add_argument("--token", default=None, help=f"clients must send 'Authorization: Bearer TOKEN' (at least "
                        f"{MIN_TOKEN_CHARS} characters; default: ${TOKEN_ENV})")
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once, one per GPU (default: 1)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest upload per job (default: 512)")
    parser.add_argument("--max-audio-seconds", type=float, default=1800, help="longest speech per job (default: 1800)")
    parser.add_argument("--max-queued", type=int, default=1000, help="jobs waiting or running at once (default: 1000)")
    _add_schema(parser, LoadOptions)
    parser.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, token: str | None) -> None:
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise OptionError(f"--token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is None and not is_loopback(host):
        raise OptionError(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs; "
                          f"pass --token TOKEN (or set {TOKEN_ENV}) or listen on 127.0.0.1")


def worker_devices(device: str, workers: int) -> list[str]:
    """One device per worker: N workers take cuda:0..N-1; on the CPU they share it."""
    if workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        return [device]
    if device == "cpu":
        return ["cpu"] * workers
    import torch

    count = torch.cuda.device_count()
    if device in ("auto", "cuda"):
        if count == 0 and device == "auto":
            return ["cpu"] * workers
        if count < workers:
            raise OptionError(f"--workers {workers}: this machine has {count} CUDA GPU(s); one worker runs per GPU")
        return [f"cuda:{i}" for i in range(workers)]
    raise OptionError(f"--workers {workers} with --device {device}: each worker needs its own GPU; use --device auto "
                      "(workers take cuda:0, cuda:1, ...)")


def _load_pipelines(load: LoadOptions, devices: list[str]) -> list:
    from ..pipeline import InfiniteTalkPipeline

    pipes, errors = [None] * len(devices), [None] * len(devices)

    def load_one(i: int) -> None:
        pipe = InfiniteTalkPipeline()
        try:
            plan = pipe.load_models(dataclasses.replace(load, device=devices[i]),
                                    progress=lambda msg: print(f"worker {i}: {msg}", file=sys.stderr, flush=True))
            if i == 0:
                for line in plan.get("lines", []):
                    print("  " + line, file=sys.stderr)
            pipes[i] = pipe
        except BaseException as err:
            pipe.release_processes()  # torchrun: the other processes stop too
            errors[i] = err

    if len(devices) == 1:  # in the main thread: a torchrun process group's SIGTERM handler is set there
        load_one(0)
        devices = []
    threads = [threading.Thread(target=load_one, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return pipes


def cmd_serve(ns: argparse.Namespace) -> int:
    from ..cli import _build
    from ..parallel.launch import PeerError
    from .store import JobStore
    from .uploads import Limits

    try:
        import uvicorn

        from .api import create_app
    except ImportError as err:
        raise OptionError(f"the service needs fastapi, uvicorn and python-multipart ({err}); install them with "
                          "pip install 'infinite_talk[service]'") from None
    from ..parallel.launch import world_from_env

    world = world_from_env()  # every process checks the same flags: one that refused would leave the others waiting
    if world.size > 1 and ns.workers != 1:
        raise OptionError(f"--workers {ns.workers}: under torchrun the {world.size} processes run each job together "
                          "(sequence parallel over all their GPUs), one job at a time; use --workers 1, or start "
                          "the service without torchrun for one job per GPU")
    token = ns.token if ns.token is not None else os.environ.get(TOKEN_ENV) or None
    check_exposure(ns.host, token)
    if not 0 <= ns.port <= 65535:
        raise OptionError(f"--port must be 0-65535, got {ns.port}")
    for name in ("max_upload_mb", "max_audio_seconds", "max_queued"):
        if getattr(ns, name) <= 0:
            raise OptionError(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    load = _build(LoadOptions, ns)
    if getattr(load, "mode", "standard") != "standard":  # it sets per-job sampling values the queue does not apply yet
        raise OptionError(f"--mode {load.mode} is not available in the job service yet; pass its sampling values "
                          "(steps, text_scale, audio_scale, scheduler) in each job's options instead")
    if not world.is_leader:  # no HTTP, no files: the transformer calls of rank 0's jobs, until it stops
        from ..parallel.follower import run_follower

        return run_follower(lambda: load, world, ns.debug)
    devices = worker_devices(load.device, ns.workers)
    limits = Limits(max_upload_bytes=int(ns.max_upload_mb * 2**20), max_audio_seconds=float(ns.max_audio_seconds),
                    max_queued=int(ns.max_queued))
    store = JobStore(ns.data_dir, limits)
    store.acquire_runner_lock()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipes = _load_pipelines(load, devices)

    from .worker import Worker

    stop = threading.Event()
    workers: list = []
    try:
        resumed = store.requeue_interrupted()
        store.sweep_orphans()
        if resumed:
            print(f"resuming {len(resumed)} interrupted job(s): {', '.join(resumed)}", file=sys.stderr, flush=True)
        workers = [Worker(store, pipe, f"worker-{i}", stop, on_broken=lambda: setattr(server, "should_exit", True))
                   for i, pipe in enumerate(pipes)]
        server = uvicorn.Server(uvicorn.Config(create_app(store, token, workers), host=ns.host, port=ns.port,
                                               log_level="info"))
        for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn handles them while serving, then raises them again
            signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
        for w in workers:
            w.start()
        print(f"serving on http://{ns.host}:{ns.port} (data: {store.root}, {len(workers)} worker(s)"
              + (f", each job on {world.size} processes" if world.size > 1 else "")
              + f", {'token required' if token else 'no token: loopback only'})", file=sys.stderr, flush=True)
        server.run()
    finally:
        stop.set()
        _stop(pipes, workers, world)
    broken = [w.broken for w in workers if w.broken]
    if broken:
        raise PeerError(broken[0])
    if not server.started:
        raise OptionError(f"the server could not listen on {ns.host}:{ns.port} (uvicorn's message is above), e.g. "
                          "the port is in use: choose another --port")
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _stop(pipes: list, workers: list, world) -> None:
    """After the server stopped: a single process leaves running jobs as they are (they resume at the next start);
    a torchrun service first lets its worker leave the job at the next step, then tells the other processes to exit."""
    if world.size > 1:
        for w in workers:
            if w.is_alive():
                w.join(STOP_WAIT_S)
    busy = [w.current for w in workers if w.is_alive() and w.current]
    if busy:  # the running jobs resume from their last chunk at the next start; don't wait for them
        print(f"stopped; {len(busy)} running job(s) resume at the next start", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    for pipe in pipes:
        pipe.release_processes()
