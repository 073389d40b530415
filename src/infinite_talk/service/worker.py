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

Storage faults (the database locked by another process, a full disk, a read-only folder, I/O errors) never fail a
job. Progress rows are best-effort (skipped while the database cannot be written); a fault that stops the job (its
checkpoint or video cannot be written) gives it back to the queue with its checkpoint, and the worker takes no job
until a probe write succeeds, retrying with backoff (one log line per retry; `status` says so for /health). A job's
final row is retried the same way until it is written.
"""

from __future__ import annotations

import functools
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
from .live import LiveWriter
from .store import Job, JobStore, storage_fault, without_paths

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5  # progress rows written at most this often (plus at each new chunk and its last step)
CANCEL_POLL_S = 0.25
IDLE_POLL_S = 1.0  # also picks up jobs submitted by another process (a web UI on the same data folder)
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # storage retries: doubling from the first delay up to the last
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


class StorageDown(Exception):
    """A storage fault stopped the running job (it goes back to the queue with its checkpoint)."""


class Worker(threading.Thread):
    def __init__(self, store: JobStore, pipeline, name: str, stop: threading.Event, on_broken=None,
                 retry_first_s: float = RETRY_FIRST_S, retry_max_s: float = RETRY_MAX_S,
                 gpu: threading.Lock | None = None, ready=None, on_end=None):
        """`gpu`: held while a job is claimed and run (the web UI takes it to load models between jobs, and sets
        `pipeline` anew); `ready()`: whether jobs can be taken now (the UI's models are loaded); `on_end(job_id)`:
        called after each job the worker ran, whatever its end."""
        super().__init__(name=name, daemon=True)
        self.store, self.pipeline, self.stop = store, pipeline, stop
        self.gpu = gpu or threading.Lock()
        self.ready = ready or (lambda: True)
        self.on_end = on_end or (lambda job_id: None)
        self.current: str | None = None
        self.on_broken = on_broken or (lambda: None)
        self.broken: str | None = None  # torchrun: why the processes can run no more jobs together
        self.retry_first_s, self.retry_max_s = retry_first_s, retry_max_s
        self.storage_error: str | None = None  # why storage cannot be used now (None: it works)
        self.retries = 0
        self.next_retry_at: float | None = None
        self._skip_writes_until = 0.0  # best-effort rows are skipped until then, after one failed
        self.progress_error: str | None = None  # why the running job's progress is not being recorded

    @property
    def status(self) -> dict:
        """What the worker does, for /health."""
        if self.broken:
            state = "stopped"
        elif not self.is_alive():
            state = "stopped" if self.stop.is_set() else "not running"
        elif self.storage_error:
            state = "storage unavailable, retrying"
        else:
            state = "running a job" if self.current else "idle"
        out = {"name": self.name, "state": state, "busy": self.current is not None, "job": self.current}
        if self.storage_error:
            wait = max(0.0, (self.next_retry_at or time.monotonic()) - time.monotonic())
            out.update(error=self.storage_error, retries=self.retries, next_retry_s=round(wait, 1))
        elif self.progress_error and self.current:
            out["warning"] = f"progress not recorded: {self.progress_error}"
        if self.broken:
            out["error"] = self.broken
        return out

    def run(self) -> None:
        while not self.stop.is_set() and self.broken is None:
            if self.storage_error and not self._retry(self.store.probe, "the data folder"):
                continue
            with self.gpu:
                if self._turn():
                    continue
            self.retries = 0
            self.store.wait_for_work(IDLE_POLL_S)
            self._keep_peers_alive()

    def _turn(self) -> bool:
        """Claim and run the next job, holding the GPU; False when there is none (or the models are not ready)."""
        if not self.ready():
            return False
        try:
            job = self.store.claim_next(self.name, patience_s=0)
        except Exception as err:
            self._storage_failed(err, "cannot take the next job")
            return True
        self._storage_ok()
        if job is None:
            return False
        self.current = job.id
        try:
            try:
                self.process(job)
            except ServiceStopping:
                log.info("%s: job %s stopped with the server; it resumes from its last chunk at the next start",
                         self.name, job.id)
            except StorageDown as err:
                self._storage_failed(err.__cause__ or err, f"job {job.id} stopped")
                self._give_back(job, f"waiting for storage to resume: {self.storage_error}")
            except Exception as err:  # around the job's run (its rows, its checkpoint)
                if storage_fault(err):
                    self._storage_failed(err, f"job {job.id} stopped")
                    self._give_back(job, f"waiting for storage to resume: {self.storage_error}")
                else:  # not a fault that passes: running it again would fail again
                    log.exception("%s: job %s failed", self.name, job.id)
                    error = without_paths(f"internal error: {type(err).__name__}: {err}", self.store.root)
                    self._write_until_done(f"job {job.id} failed", functools.partial(
                        self._fail_row, job.id, error))
            finally:
                self.current = None
        finally:
            self.on_end(job.id)
        return True

    # ------------------------------------------------------------------------------------------- storage

    def _delay(self) -> float:
        return min(self.retry_first_s * 2 ** max(self.retries - 1, 0), self.retry_max_s)

    def _storage_failed(self, err: BaseException, what: str) -> None:
        why = storage_fault(err) or f"unexpected {type(err).__name__}: {err}"
        self.retries += 1
        self.storage_error = why
        delay = self._delay()
        self.next_retry_at = time.monotonic() + delay
        log.warning("%s: %s: storage unavailable (%s); retry %d in %.1f s", self.name, what, why, self.retries,
                    delay)
        self.stop.wait(delay)

    def _storage_ok(self) -> None:
        """Storage answered again; the backoff (`retries`) restarts only once a job makes progress."""
        if self.storage_error:
            log.info("%s: storage answers again after %d retries", self.name, self.retries)
        self.storage_error, self.next_retry_at = None, None

    def _retry(self, action, what: str, clears: bool = True) -> bool:
        try:
            action()
        except Exception as err:
            self._storage_failed(err, what)
            return False
        if clears:
            self._storage_ok()
        return True

    def _write_until_done(self, what: str, action, clears: bool = True) -> bool:
        """Retry a row that must be written (a job's end) until it is, or the server stops (False: then the next
        start requeues the job, and its checkpoint finishes it)."""
        while not self.stop.is_set():
            if self._retry(lambda: action(0), what, clears):
                return True
        return False

    def _fail_row(self, job_id: str, error: str, patience: float) -> None:
        if self.store.get(job_id).state == "running":  # not when the job's end was recorded before the error
            self.store.finish(job_id, "failed", patience, error=error)

    def _give_back(self, job: Job, note: str | None) -> None:
        """A job this worker can no longer run goes back to the queue, in its place, with its checkpoint; the
        worker takes jobs again once a probe write succeeds."""
        if self._write_until_done(f"job {job.id} back to the queue",
                                  lambda patience: self.store.requeue(job.id, self.name, note, patience),
                                  clears=False):
            log.info("%s: job %s back in the queue; it resumes from its checkpoint", self.name, job.id)

    def _best_effort(self, action) -> None:
        """Rows that only inform (progress, chunk counts): skipped for a while when storage fails."""
        now = time.monotonic()
        if now < self._skip_writes_until:
            return
        try:
            action()
            self.progress_error = None
        except Exception as err:
            why = storage_fault(err)
            if why is None:
                raise
            self.progress_error = why
            self._skip_writes_until = now + self.retry_max_s
            log.warning("%s: progress not recorded: %s; the job continues, the next try in %.0f s", self.name,
                        why, self.retry_max_s)

    # ------------------------------------------------------------------------------------------------ job

    def process(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        checkpoint = JobCheckpoint(folder)
        resume = checkpoint.load()
        digest = FramesHash()  # over every generated frame in order, earlier chunks included when resuming
        if resume is not None:
            resume.earlier_frames = hashed(resume.earlier_frames, digest)
        plan = dict(job.plan)
        plan["load"] = {"lines": self.pipeline.load_plan.lines if self.pipeline.load_plan else [], "worker": self.name}
        self.store.update(job.id, plan=plan, error=None, resumed_from_chunk=resume.next_chunk if resume else None,
                          patience_s=0)
        log.info("%s: job %s %s", self.name, job.id,
                 f"resumes at chunk {resume.next_chunk + 1}/{resume.num_chunks}" if resume else "starts")
        self.progress_error = None
        last = {"t": 0.0, "chunk": None, "cancel_t": 0.0, "cancel": False,
                "chunks_done": resume.next_chunk if resume else 0}
        self._skip_writes_until = 0.0

        def progress(info: dict) -> None:
            now = time.monotonic()
            final_step = info.get("step") == info.get("steps")  # a chunk's last step: the report pages end on
            if info["chunk"] != last["chunk"] or final_step or now - last["t"] >= PROGRESS_EVERY_S:
                last["t"], last["chunk"] = now, info["chunk"]
                row = {k: round(v, 2) if isinstance(v, float) else v for k, v in info.items()}
                self._best_effort(lambda: self.store.update(job.id, progress=row, patience_s=0))

        def should_stop() -> bool:
            if self.stop.is_set() and self.pipeline.peers is not None:
                raise ServiceStopping()
            now = time.monotonic()
            if now - last["cancel_t"] >= CANCEL_POLL_S:
                last["cancel_t"] = now
                try:
                    last["cancel"] = self.store.cancel_requested(job.id)
                except Exception as err:  # unreadable for a moment: the last answer stands
                    if storage_fault(err) is None:
                        raise
            return last["cancel"]

        def on_checkpoint(state, frames) -> None:
            checkpoint.save(state, frames)
            self.retries = 0  # storage works again: the next fault's backoff starts over
            last["chunks_done"] = state.next_chunk
            digest.update(frames)
            self._best_effort(lambda: self.store.update(job.id, chunks_done=state.next_chunk, seed=state.seed,
                                                        patience_s=0))

        request = request_for(job, folder)
        live = LiveWriter(folder, request)

        def on_chunk_done(state, frames) -> None:
            on_checkpoint(state, frames)
            live.on_chunk(state.next_chunk - 1, frames, state.frames_written - len(frames))

        try:
            result = self.pipeline.generate(request, progress=progress, should_stop=should_stop,
                                            on_checkpoint=on_chunk_done, resume=resume)
        except CancelledError as err:
            self._finish(job, folder, checkpoint, "cancelled", str(err))
        except Exception as err:
            if storage_fault(err):  # the job itself is fine: it continues once storage is back
                raise StorageDown(str(err)) from err
            if isinstance(err, InfiniteTalkError):
                self._finish(job, folder, checkpoint, "failed", str(err))
            else:
                log.error("%s: job %s failed:\n%s", self.name, job.id, traceback.format_exc())
                self._finish(job, folder, checkpoint, "failed", f"internal error: {type(err).__name__}: {err}")
        else:
            done = self._write_until_done(
                f"job {job.id} completed", lambda patience: self.store.finish(
                    job.id, "completed", patience, frames=result.frames, seed=result.seed, error=None,
                    chunks_done=last["chunks_done"], frames_sha256=digest.hexdigest()))
            if done:
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
        error = public_text(error, folder, job)
        if not self._write_until_done(f"job {job.id} {state}", lambda patience: self.store.finish(
                job.id, state, patience, error=error, frames=frames, seed=seed)):
            return
        checkpoint.clear()
        log.info("%s: job %s %s: %s", self.name, job.id, state, error)


def public_text(text: str, folder: Path, job: Job) -> str:
    """A message without the server's paths: the job's files by their client names, other paths by base name."""
    for entry in job.inputs.values():
        text = text.replace(str(folder / entry["file"]), entry["name"])
    text = text.replace(str(folder / VIDEO_NAME), f"{job.id}.mp4")
    return without_paths(text, folder.parent.parent)

