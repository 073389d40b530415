"""Workers: one thread per GPU, each with its own loaded pipeline, taking queued jobs in submission order.

A job runs through `InfiniteTalkPipeline.generate` with a checkpoint after every chunk; when the job was interrupted
(server killed, machine restarted) it continues from the last checkpoint with the saved noise-generator state and
context frames, so the finished video has the frames of an uninterrupted run with the same seed.

Under torchrun (`torchrun --nproc-per-node N -m infinite_talk.cli serve ...`) rank 0's one worker runs every job's
transformer calls on all N processes (parallel/peers.py): the job ends with an `end` message, an idle queue sends a
keep-alive, and a stopping server leaves the running job at its next step (it resumes at the next start) so that
rank 0 can tell the others to exit. A failure that leaves the processes out of step (a process died, a transformer
call broke off) fails the job with its message; then the worker runs no more jobs and stops the server
(`on_broken`): restarted, it continues the queue.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from pathlib import Path

from ..errors import CancelledError, InfiniteTalkError
from ..media.frames_hash import FramesHash, hashed
from ..options import GenerateOptions
from ..parallel.launch import PeerError
from .checkpoint import JobCheckpoint
from .store import Job, JobStore

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5  # progress rows written at most this often (plus at each new chunk)
CANCEL_POLL_S = 0.25
IDLE_POLL_S = 1.0  # also picks up jobs submitted by another process (a web UI on the same data folder)
VIDEO_NAME = "output.mp4"
SIDECAR_NAME = "output.json"


def request_for(job: Job, folder: Path) -> GenerateOptions:
    """The job's options with the server's own paths for its inputs and output."""
    ref = job.inputs["reference"]
    paths = {"image" if ref["kind"] == "image" else "video": str(folder / ref["file"]),
             "audio": str(job.input_path(folder, "audio")), "out": str(folder / VIDEO_NAME)}
    if "audio2" in job.inputs:
        paths["audio2"] = str(job.input_path(folder, "audio2"))
    return GenerateOptions(**job.options, **paths).validate()


class ServiceStopping(BaseException):
    """The server stops while a torchrun service runs a job: the job leaves at its next step, between transformer
    calls, so that rank 0 can tell the other processes to exit; it resumes from its last chunk at the next start."""


class Worker(threading.Thread):
    def __init__(self, store: JobStore, pipeline, name: str, stop: threading.Event, on_broken=None):
        super().__init__(name=name, daemon=True)
        self.store, self.pipeline, self.stop = store, pipeline, stop
        self.current: str | None = None
        self.on_broken = on_broken or (lambda: None)
        self.broken: str | None = None  # torchrun: why the processes can run no more jobs together

    def run(self) -> None:
        while not self.stop.is_set() and self.broken is None:
            try:
                job = self.store.claim_next(self.name)
            except Exception:  # a locked or briefly unavailable database: try again
                log.exception("%s: cannot read the queue", self.name)
                job = None
            if job is None:
                self.store.wait_for_work(IDLE_POLL_S)
                self._keep_peers_alive()
                continue
            self.current = job.id
            try:
                self.process(job)
            except ServiceStopping:
                log.info("%s: job %s stopped with the server; it resumes from its last chunk at the next start",
                         self.name, job.id)
            except Exception:  # the queue itself failed (disk full...); the job resumes at the next start
                log.exception("%s: job %s interrupted", self.name, job.id)
                self.stop.wait(IDLE_POLL_S)
            finally:
                self.current = None

    def process(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        checkpoint = JobCheckpoint(folder)
        resume = checkpoint.load()
        digest = FramesHash()  # over every generated frame in order, earlier chunks included when resuming
        if resume is not None:
            resume.earlier_frames = hashed(resume.earlier_frames, digest)
        plan = dict(job.plan)
        plan["load"] = {"lines": (self.pipeline.load_plan or {}).get("lines", []), "worker": self.name}
        self.store.update(job.id, plan=plan, error=None, resumed_from_chunk=resume.next_chunk if resume else None)
        log.info("%s: job %s %s", self.name, job.id,
                 f"resumes at chunk {resume.next_chunk + 1}/{resume.num_chunks}" if resume else "starts")
        last = {"t": 0.0, "chunk": None, "cancel_t": 0.0, "cancel": False}

        def progress(info: dict) -> None:
            now = time.monotonic()
            if info["chunk"] != last["chunk"] or now - last["t"] >= PROGRESS_EVERY_S:
                last["t"], last["chunk"] = now, info["chunk"]
                self.store.update(job.id, progress={k: round(v, 2) if isinstance(v, float) else v
                                                    for k, v in info.items()})

        def should_stop() -> bool:
            if self.stop.is_set() and self.pipeline.peers is not None:
                raise ServiceStopping()
            now = time.monotonic()
            if now - last["cancel_t"] >= CANCEL_POLL_S:
                last["cancel_t"], last["cancel"] = now, self.store.cancel_requested(job.id)
            return last["cancel"]

        def on_checkpoint(state, frames) -> None:
            checkpoint.save(state, frames)
            digest.update(frames)
            self.store.update(job.id, chunks_done=state.next_chunk, seed=state.seed)

        try:
            result = self.pipeline.generate(request_for(job, folder), progress=progress, should_stop=should_stop,
                                            on_checkpoint=on_checkpoint, resume=resume)
        except CancelledError as err:
            self._finish(job, folder, checkpoint, "cancelled", str(err))
        except InfiniteTalkError as err:
            self._finish(job, folder, checkpoint, "failed", str(err))
        except Exception as err:
            log.error("%s: job %s failed:\n%s", self.name, job.id, traceback.format_exc())
            self._finish(job, folder, checkpoint, "failed", f"internal error: {type(err).__name__}: {err}")
        else:
            self.store.finish(job.id, "completed", frames=result.frames, seed=result.seed, error=None,
                              frames_sha256=digest.hexdigest())
            checkpoint.clear()
            log.info("%s: job %s completed (%d frames)", self.name, job.id, result.frames)
        finally:
            self._end_job(job)

    def _end_job(self, job: Job) -> None:
        """torchrun: the other processes wait for the next job, unless this one left them out of step."""
        peers = self.pipeline.peers
        if peers is not None and not peers.end_run():
            error = self.store.get(job.id).error
            self._break(f"job {job.id} left the processes of this torchrun service out of step"
                        + (f" ({error})" if error else ""))

    def _keep_peers_alive(self) -> None:
        peers = self.pipeline.peers
        if peers is not None:
            try:
                peers.keep_alive()
            except PeerError as err:
                self._break(str(err))

    def _break(self, reason: str) -> None:
        self.broken = (f"{reason}; this torchrun service runs no more jobs and stops: restart it (queued jobs wait, "
                       "interrupted ones resume)")
        log.error("%s: %s", self.name, self.broken)
        self.on_broken()

    def _finish(self, job: Job, folder: Path, checkpoint: JobCheckpoint, state: str, error: str) -> None:
        """Cancelled or failed: the mp4 keeps the finished frames (the pipeline closes it); record what is there."""
        sidecar = folder / SIDECAR_NAME
        frames = seed = None
        if sidecar.is_file():
            try:
                data = json.loads(sidecar.read_text())
                frames, seed = data["output"]["frames"], data["seed"]
            except (ValueError, KeyError):
                pass
        self.store.finish(job.id, state, error=error, frames=frames, seed=seed)
        checkpoint.clear()
        log.info("%s: job %s %s: %s", self.name, job.id, state, error)

