"""The HTTP API (FastAPI; the OpenAPI schema is at /openapi.json, interactive docs at /docs).

`POST /jobs` (multipart: reference, audio, optional audio2, options JSON), `GET /jobs`, `GET /jobs/{id}`,
`GET /jobs/{id}/video`, `GET /jobs/{id}/sidecar`, `GET /jobs/{id}/live.m3u8` (HLS of the finished chunks, growing while
the job runs; segments at `GET /jobs/{id}/live/{n}`, live.py), `POST /jobs/{id}/cancel`, `DELETE /jobs/{id}`. With a token, every
/jobs route needs `Authorization: Bearer TOKEN`; without one, only loopback Host names are answered and state-changing
requests from a page of another origin are refused (network.py says why). Every error is JSON
`{"error": "what went wrong and what to do"}`, without the server's paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import tempfile
import time
import weakref
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InfiniteTalkError
from ..options import GenerateOptions
from .live import playlist, segment
from .network import STATE_CHANGING, loopback_host, same_loopback_origin
from .store import FINAL_STATES, Conflict, Job, JobStore, NotFound, storage_fault, without_paths
from .uploads import options_help
from .worker import SIDECAR_NAME, VIDEO_NAME

log = logging.getLogger(__name__)
FORM_OVERHEAD = 2**20  # multipart headers and the options field, on top of the files' own limit
BODY_TIMEOUT_S = 30.0  # longest pause inside a request body
MIN_BODY_RATE = 10 * 2**10  # bytes per second, on average, once a body has taken longer than the pause limit
RETRY_AFTER_S = 5
READ_THREADS = 8
STATES = Literal["queued", "running", "completed", "failed", "cancelled"]


class ErrorBody(BaseModel):
    error: str


class JobView(BaseModel):
    """A job's status: state, chunk i/n, step, ETA and the effective plan."""

    model_config = ConfigDict(extra="allow")
    id: str
    state: STATES
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = None
    chunk: int | None = None
    chunks: int | None = None
    chunks_done: int = 0
    step: int | None = None
    steps: int | None = None
    eta_s: float | None = None
    cancel_requested: bool = False
    runs: int = 0
    resumed_from_chunk: int | None = None
    seed: int | None = None
    frames: int | None = None
    frames_sha256: str | None = None
    error: str | None = None
    inputs: dict
    options: dict
    plan: dict


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = None


ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 408, 409, 413, 422, 429, 503)}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """Host, Origin, token, body size and body pace, checked before any byte of an upload is read (plain ASGI
    middleware)."""

    def __init__(self, app, token: str | None, max_body: int, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.token, self.max_body, self.body_timeout_s = app, token, max_body, body_timeout_s

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(),
                                                                             self.token.encode())
        return False

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope.get("headers", ()))
        if not self.token:
            host = headers.get(b"host", b"").decode("latin-1")
            if b"host" in headers and not loopback_host(host):
                return _error(403, f"this server has no token, so it answers only requests addressed to 127.0.0.1, "
                              f"localhost or [::1] (this one was addressed to {host[:100]!r}, as a page that renamed "
                              "itself to reach it would send); use one of those names, or start the server with "
                              "--token to serve other names")
            origin = headers.get(b"origin", b"").decode("latin-1")
            if b"origin" in headers and scope["method"] in STATE_CHANGING and not same_loopback_origin(origin, host):
                return _error(403, f"cross-origin request refused: a page from {origin[:100]!r} may not submit, "
                              "cancel or delete jobs on this server (it has no token); send the request without an "
                              "Origin header (curl, a script) or from this server's own address, or start the "
                              "server with --token")
        elif scope["path"].startswith("/jobs") and not self._authorized(scope):
            return _error(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN' with this "
                          "server's token", {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return _error(400, "Content-Length is not a number")
            if size > self.max_body:
                return self._too_large(size)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        received, refused, started, body_done = 0, None, time.monotonic(), False

        async def paced_receive():
            nonlocal received, refused, body_done
            if body_done:  # after the body: a wait for the client's disconnect, not for data
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                refused = _error(408, f"the request body stalled: no data for {self.body_timeout_s:.0f} s; send the "
                                 "upload without pauses", {"Connection": "close"})
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                elapsed = time.monotonic() - started
                if received > self.max_body:  # a body without (or with a false) Content-Length
                    refused = self._too_large(received)
                    return {"type": "http.disconnect"}
                if not body_done and elapsed > self.body_timeout_s and received < MIN_BODY_RATE * elapsed:
                    refused = _error(408, f"the request body arrives too slowly ({received / elapsed / 1024:.1f} "
                                     f"KiB/s; at least {MIN_BODY_RATE // 1024} KiB/s are needed); send it over a "
                                     "faster connection", {"Connection": "close"})
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if refused is None:
                await send(message)

        try:
            await self.app(scope, paced_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None:
            await refused(scope, receive, send)

    def _too_large(self, size: int) -> JSONResponse:
        limit = self.max_body - FORM_OVERHEAD
        return _error(413, f"the upload is over this server's limit of {limit / 2**20:.0f} MiB per job "
                      f"(got {size / 2**20:.1f} MiB or more; --max-upload-mb); send shorter or smaller files",
                      {"Connection": "close"})


def create_app(store: JobStore, token: str | None = None, workers: list | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The API over `store`; `workers` (threads with `.name`, `.current`, `.status`) only feed /health."""
    app = FastAPI(title="Infinite Talk job service", version=__version__,
                  description="Submit talking-video jobs, watch them, download the results. Jobs survive restarts: "
                              "an interrupted job resumes from its last finished chunk.")
    dependencies = [Depends(HTTPBearer(auto_error=False, description="the server's --token"))] if token else []
    workers = workers or []
    app.add_middleware(Guard, token=token, max_body=store.limits.max_upload_bytes + FORM_OVERHEAD,
                       body_timeout_s=body_timeout_s)

    hidden = (store.root, tempfile.gettempdir(), Path.home(), Path.cwd())

    def public(text: str) -> str:
        return without_paths(text, *hidden)

    def view(job: Job) -> dict:
        out = job.view(store.queue_position(job))
        if out["error"]:
            out["error"] = public(out["error"])
        return out

    @app.exception_handler(InfiniteTalkError)
    async def _known(request, err: InfiniteTalkError):
        status = getattr(err, "status", 422)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return _error(status, public(str(err)), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) + " (see /docs for the fields of each route)")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        why = storage_fault(err)
        if why is not None:
            log.warning("%s %s: storage unavailable: %s", request.method, request.url.path, why)
            return _error(503, f"the server's storage is unavailable right now: {why}; try again later",
                          {"Retry-After": str(RETRY_AFTER_S)})
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, public(f"internal error: {type(err).__name__}: {err}"))

    @app.get("/health", summary="liveness and what each worker does (no token needed)")
    async def health() -> dict:  # in the event loop: it answers even when every pool thread waits
        states = [w.status if hasattr(w, "status") else {"name": w.name, "busy": w.current is not None}
                  for w in workers]
        degraded = [s for s in states if s.get("state") not in (None, "idle", "running a job")]
        return {"status": "degraded" if degraded else "ok", "workers": states}

    @app.post("/jobs", status_code=201, response_model=JobView, responses=ERRORS, dependencies=dependencies,
              summary="submit a job")
    def submit(
        reference: UploadFile = File(..., description="reference picture (PNG/JPEG/WebP) or video (dubbing)"),
        audio: UploadFile = File(..., description="speech of speaker 1"),
        audio2: UploadFile | None = File(None, description="speech of speaker 2 (optional)"),
        options: str = Form("{}", description=options_help()),
    ):
        second = None
        if audio2 is not None and (audio2.filename or audio2.size):
            second = (audio2.filename, audio2.file)
        job = store.submit((reference.filename, reference.file), (audio.filename, audio.file), second, options)
        return JSONResponse(view(job), status_code=201,
                            headers={"Location": f"/jobs/{job.id}"})

    # Reads run on threads of their own: requests that wait to write (a database locked by another process) can
    # take every thread of the shared pool, and a read must still answer.
    readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one limiter per event loop

    def read(fn, *args):
        loop = asyncio.get_running_loop()
        if loop not in readers:
            readers[loop] = anyio.CapacityLimiter(READ_THREADS)
        return anyio.to_thread.run_sync(fn, *args, limiter=readers[loop])

    @app.get("/jobs", response_model=JobList, responses=ERRORS, dependencies=dependencies, summary="list jobs")
    async def list_jobs(state: STATES | None = None, limit: int = Query(100, ge=1, le=1000),
                        cursor: str | None = Query(None, pattern=r"^[0-9]{1,18}$", description="`next_cursor` of "
                                                   "the previous page; the first page without it")):
        def page() -> dict:
            jobs = store.list(state, limit + 1, int(cursor or 0))
            more = len(jobs) > limit
            jobs = jobs[:limit]
            return {"jobs": [view(job) for job in jobs], "next_cursor": str(jobs[-1].seq) if more else None}

        return await read(page)

    @app.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS, dependencies=dependencies,
             summary="a job's status: state, chunk i/n, step, ETA, effective plan")
    async def status(job_id: str):
        return await read(lambda: view(store.get(job_id)))

    @app.get("/jobs/{job_id}/video", response_class=FileResponse, responses=ERRORS, dependencies=dependencies,
             summary="the mp4 (also the finished frames of a cancelled or failed job)")
    async def video(job_id: str):
        job, path = await read(_output, store, job_id, VIDEO_NAME)
        return FileResponse(path, media_type="video/mp4", filename=f"infinite-talk-{job.id}.mp4")

    @app.get("/jobs/{job_id}/sidecar", responses=ERRORS, dependencies=dependencies,
             summary="the JSON sidecar: requested vs effective options, seed, timings, versions")
    async def sidecar(job_id: str) -> dict:
        def load() -> dict:
            job, path = _output(store, job_id, SIDECAR_NAME)
            return public_sidecar(path.read_text(), job, store.folder(job_id))

        return await read(load)

    @app.get("/jobs/{job_id}/live.m3u8", responses=ERRORS, dependencies=dependencies,
             response_class=Response, summary="live playback (HLS): the finished chunks of a job, growing while it "
             "runs; #EXT-X-ENDLIST once it has ended")
    async def live_playlist(job_id: str):
        def build() -> str:
            job = store.get(job_id)
            longest = job.options.get("frame_num") or GenerateOptions.__dataclass_fields__["frame_num"].default
            return playlist(store.folder(job_id), job.state in FINAL_STATES, int(longest))

        return Response(await read(build), media_type="application/vnd.apple.mpegurl",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/jobs/{job_id}/live/{n}", response_class=FileResponse, responses=ERRORS, dependencies=dependencies,
             summary="live playback: segment n (chunk n+1) as a self-contained fragmented mp4")
    async def live_segment(job_id: str, n: int = PathParam(..., ge=0, le=99999)):
        def find() -> Path:
            job = store.get(job_id)
            found = segment(store.folder(job_id), n)
            if found is None:
                raise NotFound(f"job {job_id} ({job.state}) has no finished chunk {n + 1} yet; the playlist "
                               f"/jobs/{job_id}/live.m3u8 lists the finished ones")
            return found

        return FileResponse(await read(find), media_type="video/mp4", headers={"Cache-Control": "no-cache"})

    @app.post("/jobs/{job_id}/cancel", response_model=JobView, responses=ERRORS, dependencies=dependencies,
              summary="cancel: a queued job at once, a running one at its next step (finished chunks are kept)")
    def cancel(job_id: str):
        job = store.cancel(job_id)
        return JSONResponse(view(job), status_code=202 if job.state == "running" else 200)

    @app.delete("/jobs/{job_id}", responses=ERRORS, dependencies=dependencies,
                summary="delete a job that is not running, with its files")
    def delete(job_id: str) -> dict:
        store.delete(job_id)
        return {"deleted": job_id}

    return app


def _output(store: JobStore, job_id: str, name: str) -> tuple[Job, Path]:
    job = store.get(job_id)
    if job.state in ("queued", "running"):
        where = f" (chunk {job.chunks_done}/{job.view()['chunks']} finished)" if job.state == "running" else ""
        raise Conflict(f"job {job_id} is {job.state}{where}; its {'video' if name == VIDEO_NAME else 'sidecar'} is "
                       "ready when it has finished")
    path = store.folder(job_id) / name
    if not path.is_file():
        raise NotFound(f"job {job_id} {job.state} before any frame was finished ({job.error}); there is no output")
    return job, path


def public_sidecar(text: str, job: Job, folder: Path) -> dict:
    """The sidecar with the server's paths replaced by the client's file names."""
    for entry in job.inputs.values():
        text = text.replace(json.dumps(str(folder / entry["file"]))[1:-1], json.dumps(entry["name"])[1:-1])
    text = text.replace(json.dumps(str(folder / VIDEO_NAME))[1:-1], f"{job.id}.mp4")
    data = json.loads(text)
    files = ((data.get("load") or {}).get("effective") or {}).get("files")
    if isinstance(files, dict):  # model files: names only
        data["load"]["effective"]["files"] = {k: [Path(x).name for x in v] if isinstance(v, list) else
                                              Path(v).name if isinstance(v, str) else v for k, v in files.items()}
    return data
