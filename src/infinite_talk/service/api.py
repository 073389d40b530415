"""The HTTP API (FastAPI; the OpenAPI schema is at /openapi.json, interactive docs at /docs).

`POST /jobs` (multipart: reference, audio, optional audio2, options JSON), `GET /jobs`, `GET /jobs/{id}`,
`GET /jobs/{id}/video`, `GET /jobs/{id}/sidecar`, `POST /jobs/{id}/cancel`, `DELETE /jobs/{id}`. With a token, every
/jobs route needs `Authorization: Bearer TOKEN`. Every error is JSON `{"error": "what went wrong and what to do"}`.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, File, Form, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InfiniteTalkError
from .store import Conflict, Job, JobStore, NotFound
from .worker import SIDECAR_NAME, VIDEO_NAME

log = logging.getLogger(__name__)
FORM_OVERHEAD = 2**20  # multipart headers and the options field, on top of the files' own limit
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


ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429)}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """Token and body size, checked before any byte of an upload is read (plain ASGI middleware)."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(),
                                                                             self.token.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token and scope["path"].startswith("/jobs") and not self._authorized(scope):
            return await _error(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN' with "
                                "this server's token", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _error(400, "Content-Length is not a number")(scope, receive, send)
            if size > self.max_body:
                return await self._too_large(size)(scope, receive, send)
        received, exceeded = 0, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a body without (or with a false) Content-Length
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await self._too_large(received)(scope, receive, send)

    def _too_large(self, size: int) -> JSONResponse:
        limit = self.max_body - FORM_OVERHEAD
        return _error(413, f"the upload is over this server's limit of {limit / 2**20:.0f} MiB per job "
                      f"(got {size / 2**20:.1f} MiB or more; --max-upload-mb); send shorter or smaller files")


def create_app(store: JobStore, token: str | None = None, workers: list | None = None) -> FastAPI:
    """The API over `store`; `workers` (threads with `.name`, `.current`) only feed /health."""
    app = FastAPI(title="Infinite Talk job service", version=__version__,
                  description="Submit talking-video jobs, watch them, download the results. Jobs survive restarts: "
                              "an interrupted job resumes from its last finished chunk.")
    dependencies = [Depends(HTTPBearer(auto_error=False, description="the server's --token"))] if token else []
    workers = workers or []
    app.add_middleware(Guard, token=token, max_body=store.limits.max_upload_bytes + FORM_OVERHEAD)

    @app.exception_handler(InfiniteTalkError)
    async def _known(request, err: InfiniteTalkError):
        return _error(getattr(err, "status", 422), str(err))

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

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    @app.get("/health", summary="liveness (no token needed)")
    def health() -> dict:
        return {"status": "ok", "workers": [{"name": w.name, "busy": w.current is not None} for w in workers]}

    @app.post("/jobs", status_code=201, response_model=JobView, responses=ERRORS, dependencies=dependencies,
              summary="submit a job")
    def submit(
        reference: UploadFile = File(..., description="reference picture (PNG/JPEG/WebP) or video (dubbing)"),
        audio: UploadFile = File(..., description="speech of speaker 1"),
        audio2: UploadFile | None = File(None, description="speech of speaker 2 (optional)"),
        options: str = Form("{}", description='GenerateOptions as JSON without paths, e.g. {"steps": 8, "seed": 1}'),
    ):
        second = None
        if audio2 is not None and (audio2.filename or audio2.size):
            second = (audio2.filename, audio2.file)
        job = store.submit((reference.filename, reference.file), (audio.filename, audio.file), second, options)
        return JSONResponse(job.view(store.queue_position(job)), status_code=201,
                            headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs", response_model=JobList, responses=ERRORS, dependencies=dependencies, summary="list jobs")
    def list_jobs(state: STATES | None = None, limit: int = Query(100, ge=1, le=1000)):
        return {"jobs": [job.view(store.queue_position(job)) for job in store.list(state, limit)]}

    @app.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS, dependencies=dependencies,
             summary="a job's status: state, chunk i/n, step, ETA, effective plan")
    def status(job_id: str):
        job = store.get(job_id)
        return job.view(store.queue_position(job))

    @app.get("/jobs/{job_id}/video", response_class=FileResponse, responses=ERRORS, dependencies=dependencies,
             summary="the mp4 (also the finished frames of a cancelled or failed job)")
    def video(job_id: str):
        job, path = _output(store, job_id, VIDEO_NAME)
        return FileResponse(path, media_type="video/mp4", filename=f"infinite-talk-{job.id}.mp4")

    @app.get("/jobs/{job_id}/sidecar", responses=ERRORS, dependencies=dependencies,
             summary="the JSON sidecar: requested vs effective options, seed, timings, versions")
    def sidecar(job_id: str) -> dict:
        job, path = _output(store, job_id, SIDECAR_NAME)
        return public_sidecar(path.read_text(), job, store.folder(job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=JobView, responses=ERRORS, dependencies=dependencies,
              summary="cancel: a queued job at once, a running one at its next step (finished chunks are kept)")
    def cancel(job_id: str):
        job = store.cancel(job_id)
        return JSONResponse(job.view(store.queue_position(job)), status_code=202 if job.state == "running" else 200)

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
