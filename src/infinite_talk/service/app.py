"""`infinite-talk serve`: the job service (HTTP API + one worker per GPU) on a data folder.

The model options are those of `generate` (built from the same schema), `--preset tiny` included. The models are
loaded before the server listens, so a refused option or a missing file stops it with one clear line (a busy port
too: the socket is bound first). A token is required whenever the server listens beyond loopback; without one the API
answers loopback Host names only (network.py). Connections are bounded (connections.py: idle deadline, a cap from the
open-file limit; api.Guard: stalled bodies), SIGTERM waits at most --shutdown-timeout for requests in flight, and
everything the server writes is private to its user (umask 077).

`torchrun --nproc-per-node N -m infinite_talk.cli serve ...`: rank 0 is the service (API, job store, one worker);
its worker runs every job's transformer calls sequence-parallel over all N processes. The other processes serve
no HTTP and write nothing: they follow job after job (follower.py) until rank 0 stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import signal
import socket
import sys
import threading

from ..errors import OptionError
from ..flags import add_schema, build_options
from ..library_messages import filter_library_noise
from ..model_files import check_model_source
from ..options import LoadOptions
from .network import is_loopback

TOKEN_ENV = "INFINITE_TALK_TOKEN"
MIN_TOKEN_CHARS = 16
STOP_WAIT_S = 20  # torchrun: the running job's next step, before the launcher's SIGKILL (30 s after its SIGTERM)
DEFAULT_MAX_CONNECTIONS = 512
FILES_RESERVED = 96  # descriptors kept for the process itself (models, database, checkpoints, encoder)
FILES_PER_WORKER = 16
FILES_PER_CONNECTION = 2  # its socket and, for an upload, the spooled file
ACCEPT_BURST = 32  # listen backlog, which is also how many connections asyncio accepts before the cap sees them
MAX_HEADER_BYTES = 16 * 2**10  # a request line and headers larger than this are answered 400 (h11)


def add_cli(subparsers) -> None:
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
    parser.add_argument("--max-connections", type=int, default=None, help="open connections at once; at the limit "
                        "the longest-idle one is closed (default: 512, fewer when the open-file limit is low)")
    parser.add_argument("--idle-timeout", type=float, default=10.0, help="seconds a connection may stay open "
                        "without a request in progress (before its first request, between requests, or while its "
                        "headers arrive) (default: 10)")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="longest pause inside a request body, in "
                        "seconds; a body slower than 10 KiB/s on average past it is refused too; a client that "
                        "reads nothing of its response for as long is disconnected (default: 30)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds SIGTERM waits for requests "
                        "in flight (uploads) before closing them (default: 10)")
    add_schema(parser, LoadOptions)
    parser.set_defaults(func=cmd_serve)


def check_exposure(host: str, token: str | None) -> None:
    if token is not None and not token.strip():
        raise OptionError(f"the token (--token or ${TOKEN_ENV}) is blank (only spaces): no client could ever send it; pass a real token, e.g. "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe())', or leave it unset to serve "
                          "loopback only")
    if token is not None and (token != token.strip() or not token.isascii() or not token.isprintable()
                              or " " in token):
        raise OptionError(f"the token (--token or ${TOKEN_ENV}) has spaces, control or non-ASCII characters, which an Authorization header cannot "
                          "carry as given; use letters, digits and punctuation only, e.g. "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise OptionError(f"--token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is None and not is_loopback(host):
        raise OptionError(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs; "
                          f"pass --token TOKEN (or set {TOKEN_ENV}) or listen on 127.0.0.1")


def connection_limit(requested: int | None, workers: int) -> tuple[int, int]:
    """(connections allowed at once, the open-file limit), after raising the soft open-file limit to the hard
    one; a requested number the limit cannot carry is refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    budget = ((10**6 if soft == resource.RLIM_INFINITY else soft) - FILES_RESERVED - FILES_PER_WORKER * workers
              - ACCEPT_BURST)
    fits = budget // FILES_PER_CONNECTION
    if requested is not None:
        if requested < 1:
            raise OptionError(f"--max-connections must be at least 1, got {requested}")
        if requested > fits:
            needed = requested * FILES_PER_CONNECTION + FILES_RESERVED + FILES_PER_WORKER * workers + ACCEPT_BURST
            raise OptionError(f"--max-connections {requested} needs about {needed} open files; this process may "
                              f"open {soft} (ulimit -n): raise that limit or ask for at most {max(fits, 0)}")
        return requested, soft
    if fits < 8:
        raise OptionError(f"the open-file limit is {soft} (ulimit -n): too low to serve; raise it to at least "
                          f"{FILES_RESERVED + FILES_PER_WORKER * workers + ACCEPT_BURST + 8 * FILES_PER_CONNECTION}")
    return min(DEFAULT_MAX_CONNECTIONS, fits), soft


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts: a busy port stops `serve` with one clear line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise OptionError(f"--host {host}: not an address this machine can listen on ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may follow its predecessor at once
        sock.bind(address)
        sock.listen(ACCEPT_BURST)
    except OSError as err:
        sock.close()
        raise OptionError(f"cannot listen on {host}:{port}: {err.strerror}; another program uses this port (or "
                          "the address is not this machine's): stop it or choose another --port") from None
    sock.set_inheritable(True)
    return sock


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
                for line in plan.lines:
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
    filter_library_noise()  # before the model libraries load (the CLI has installed it already; cheap to repeat)
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
    for name in ("max_upload_mb", "max_audio_seconds", "max_queued", "idle_timeout", "body_timeout",
                 "shutdown_timeout"):
        if not getattr(ns, name) > 0:
            raise OptionError(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    load = build_options(LoadOptions, ns)
    if getattr(load, "mode", "standard") != "standard":  # it sets per-job sampling values the queue does not apply yet
        raise OptionError(f"--mode {load.mode} is not available in the job service yet; pass its sampling values "
                          "(steps, text_scale, audio_scale, scheduler) in each job's options instead")
    check_model_source(load)  # every process: one that refused would leave the others waiting
    if not world.is_leader:  # no HTTP, no files: the transformer calls of rank 0's jobs, until it stops
        from ..follower import run_follower

        return run_follower(lambda: load, world, ns.debug)
    devices = worker_devices(load.device, ns.workers)
    max_connections, open_files = connection_limit(ns.max_connections, len(devices))
    limits = Limits(max_upload_bytes=int(ns.max_upload_mb * 2**20), max_audio_seconds=float(ns.max_audio_seconds),
                    max_queued=int(ns.max_queued))
    os.umask(0o077)  # job files, videos, the database: readable by this user only
    store = JobStore(ns.data_dir, limits)
    store.acquire_runner_lock()
    sock = listen(ns.host, ns.port)  # before the models load and before any job is taken
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipes = _load_pipelines(load, devices)

    from .connections import ConnectionLimits, bounded_protocol
    from .worker import Worker

    stop = threading.Event()
    workers: list = []
    server = None
    try:
        recovered = store.recover_at_start()
        resumed = recovered["requeued"]
        if resumed:
            print(f"resuming {len(resumed)} interrupted job(s): {', '.join(resumed)}", file=sys.stderr, flush=True)
        if recovered["swept"] or recovered["checkpoints_cleared"]:
            print(f"removed {recovered['swept']} leftover job folder(s) and {recovered['checkpoints_cleared']} "
                  "leftover checkpoint(s) of finished jobs", file=sys.stderr, flush=True)
        workers = [Worker(store, pipe, f"worker-{i}", stop, on_broken=lambda: setattr(server, "should_exit", True))
                   for i, pipe in enumerate(pipes)]
        protocol = bounded_protocol(ConnectionLimits(max_connections, ns.idle_timeout, ns.body_timeout))
        server = uvicorn.Server(uvicorn.Config(
            create_app(store, token, workers, body_timeout_s=ns.body_timeout), host=ns.host, port=ns.port,
            # uvicorn's own limit (plain-text 503) counts connections still closing too: only a backstop here
            log_level="info", http=protocol, limit_concurrency=max_connections + ACCEPT_BURST, backlog=ACCEPT_BURST,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=max(1, round(ns.idle_timeout)), timeout_graceful_shutdown=ns.shutdown_timeout))
        for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn handles them while serving, then raises them again
            signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
        for w in workers:
            w.start()
        port = sock.getsockname()[1]
        print(f"serving on http://{ns.host}:{port} (data: {store.root}, {len(workers)} worker(s)"
              + (f", each job on {world.size} processes" if world.size > 1 else "")
              + f", {'token required' if token else 'no token: loopback names only'}, at most {max_connections} "
              f"connections (open-file limit {open_files}))", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        stop.set()
        _stop(pipes, workers, world, code=0 if server is not None and server.started else 1)
    broken = [w.broken for w in workers if w.broken]
    if broken:
        raise PeerError(broken[0])
    if not server.started:
        raise OptionError(f"the server could not start on {ns.host}:{ns.port} (uvicorn's message is above)")
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _stop(pipes: list, workers: list, world, code: int) -> None:
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
        os._exit(code)
    for pipe in pipes:
        pipe.release_processes()
