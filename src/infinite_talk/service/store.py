"""The job queue: one SQLite database and one folder per job under the data folder.

Every state change is one transaction (`BEGIN IMMEDIATE`), so a killed server leaves each job either before or after
a change, never between. Job ids are `secrets.token_urlsafe(16)` (128 random bits); a job's files live in
`jobs/<id>/` under names the server chooses. `JobStore.submit` is the one way in, for the HTTP API and for any
in-process front end (the web UI): it copies and validates the inputs and plans the job before it is queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import InfiniteTalkError, InputError, OptionError
from ..options import GenerateOptions, to_dict
from .uploads import (
    SERVER_FIELDS,
    Limits,
    UploadRefused,
    check_audio,
    check_reference,
    copy_file,
    copy_upload,
    display_name,
    parse_options,
)

ID_PATTERN = r"[A-Za-z0-9_-]{22}"
FINAL_STATES = ("completed", "failed", "cancelled")
ORPHAN_AGE_S = 600  # a folder without a row this old is a submission that died half-way

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- queue order
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,                     -- queued | running | completed | failed | cancelled
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    options TEXT NOT NULL,                   -- the requested GenerateOptions (JSON, without paths)
    inputs TEXT NOT NULL,                    -- what was uploaded: kinds, sizes, durations, client file names
    plan TEXT NOT NULL,                      -- the effective plan (sampler, steps, passes, chunks; load plan once run)
    progress TEXT,                           -- the last progress report (chunk, step, ETA)
    chunks_done INTEGER NOT NULL DEFAULT 0,  -- chunks checkpointed
    seed INTEGER,
    frames INTEGER,
    frames_sha256 TEXT,                      -- SHA-256 of the generated uint8 RGB frames, before encoding
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    runs INTEGER NOT NULL DEFAULT 0,         -- times a worker started it (> 1: resumed after a restart)
    resumed_from_chunk INTEGER
);
"""


class NotFound(InfiniteTalkError):
    status = 404


class Conflict(InfiniteTalkError):
    status = 409


class QueueFull(InfiniteTalkError):
    status = 429


Source = tuple[str | None, BinaryIO] | Path | str  # (client file name, stream) from HTTP, or a local path in-process


@dataclass
class Job:
    id: str
    seq: int
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    options: dict
    inputs: dict
    plan: dict
    progress: dict | None
    chunks_done: int
    seed: int | None
    frames: int | None
    frames_sha256: str | None
    error: str | None
    cancel_requested: bool
    worker: str | None
    runs: int
    resumed_from_chunk: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        for name in ("options", "inputs", "plan", "progress"):
            data[name] = json.loads(data[name]) if data[name] else None
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)

    def input_path(self, folder: Path, name: str) -> Path | None:
        entry = self.inputs.get(name)
        return folder / entry["file"] if entry else None

    def view(self, queue_position: int | None = None) -> dict:
        """The job's status as the API shows it (no server paths)."""
        progress = self.progress or {}
        chunks = (self.plan.get("chunks") or {}).get("chunks")
        out = {
            "id": self.id,
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "queue_position": queue_position,
            "chunk": progress.get("chunk"),
            "chunks": chunks,
            "chunks_done": self.chunks_done,
            "step": progress.get("step"),
            "steps": progress.get("steps", self.plan.get("steps")),
            "eta_s": None if self.state != "running" else progress.get("eta_s"),
            "cancel_requested": self.cancel_requested,
            "runs": self.runs,
            "resumed_from_chunk": self.resumed_from_chunk,
            "seed": self.seed,
            "frames": self.frames,
            "frames_sha256": self.frames_sha256,
            "error": self.error,
            "inputs": {k: {n: v for n, v in entry.items() if n != "file"} for k, entry in self.inputs.items()},
            "options": self.options,
            "plan": self.plan,
        }
        return out


class JobStore:
    """Jobs in `<data_dir>/jobs.sqlite3`, their files in `<data_dir>/jobs/<id>/`. Safe to share between threads;
    other processes (a web UI) may open the same folder to submit."""

    def __init__(self, data_dir: str | Path, limits: Limits | None = None):
        self.root = Path(data_dir).resolve()
        self.jobs_dir = self.root / "jobs"
        self.limits = limits or Limits()
        self._lock = threading.RLock()
        self._work = threading.Condition()
        self._lock_file = None
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "jobs.sqlite3", timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise OptionError(f"data folder {self.root}: cannot open the job database there ({err}); check the path "
                              "and its permissions, or choose another --data-dir") from None

    # ----------------------------------------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _tx(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def folder(self, job_id: str) -> Path:
        if not re.fullmatch(ID_PATTERN, job_id or ""):
            raise NotFound(f"no job {job_id!r}")
        return self.jobs_dir / job_id

    def acquire_runner_lock(self) -> None:
        """One server runs the jobs of a data folder (restart resumes its running jobs; two would run them twice)."""
        handle = open(self.root / "server.lock", "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise OptionError(f"another infinite-talk server is running on the data folder {self.root}; stop it or "
                              "use another --data-dir") from None
        self._lock_file = handle

    def runner_active(self) -> bool:
        """Whether a server holds this folder's runner lock (some process works the queue)."""
        with open(self.root / "server.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    # ------------------------------------------------------------------------------------------------- submit

    def submit(self, reference: Source, audio: Source, audio2: Source | None = None,
               options: GenerateOptions | dict | str | None = None) -> Job:
        """Validate the inputs (by decoding them) and the options, plan the job and queue it.

        `options`: the GenerateOptions fields without paths, as a dict, JSON text or a GenerateOptions whose path
        fields are unset. Raises `UploadRefused` (with the fix), `QueueFull`.
        """
        request = self._request(options)
        self._check_capacity(self._db)
        job_id = secrets.token_urlsafe(16)
        folder = self.jobs_dir / job_id
        folder.mkdir()
        try:
            budget = self.limits.max_upload_bytes
            inputs = {}
            for field, source, stem in (("reference", reference, "reference"), ("audio", audio, "audio1"),
                                        ("audio2", audio2, "audio2")):
                if source is None:
                    continue
                name = _source_name(source, "")
                label = f"{field} ({name})" if name else field
                dest = folder / f"{stem}.upload"
                budget -= _copy(source, dest, budget, label, self.limits.max_upload_bytes)
                checked = (check_reference if field == "reference" else check_audio)(dest, label, self.limits)
                inputs[field] = {"name": name or field, **checked}
            plan = plan_job(request, inputs, self.limits)
            now = time.time()
            with self._tx() as db:
                self._check_capacity(db)
                db.execute("INSERT INTO jobs (id, state, created_at, options, inputs, plan) VALUES (?, ?, ?, ?, ?, ?)",
                           (job_id, "queued", now, json.dumps(_requested(request)), json.dumps(inputs),
                            json.dumps(plan)))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._work:
            self._work.notify_all()
        return self.get(job_id)

    def _request(self, options) -> GenerateOptions:
        if isinstance(options, GenerateOptions):
            named = [k for k in SERVER_FIELDS if getattr(options, k)]
            if named:
                raise UploadRefused(f"options: {', '.join(named)} must be unset; the inputs are passed as files")
            return options.validate()
        if isinstance(options, dict):
            options = json.dumps(options)
        return parse_options(options)

    def _check_capacity(self, db: sqlite3.Connection) -> None:
        with self._lock:
            (active,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
        if active >= self.limits.max_queued:
            raise QueueFull(f"the queue is full ({active} jobs waiting or running, limit {self.limits.max_queued}); "
                            "submit again when some have finished")

    # -------------------------------------------------------------------------------------------------- reads

    def get(self, job_id: str) -> Job:
        self.folder(job_id)  # refuses malformed ids
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_row(row)

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if state:
            query += " WHERE state = ?"
            args.append(state)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def queue_position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self._lock:
            (ahead,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND seq < ?",
                                        (job.seq,)).fetchone()
        return ahead

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])  # a vanished row stops the run too

    # ------------------------------------------------------------------------------------------ state changes

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops at its next step, keeping its finished chunks."""
        with self._tx() as db:
            job = self._row(db, job_id)
            if job.state == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                           (time.time(), "cancelled before it started", job_id))
            elif job.state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise Conflict(f"job {job_id} is already {job.state}; nothing to cancel")
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        folder = self.folder(job_id)
        with self._tx() as db:
            job = self._row(db, job_id)
            if job.state == "running":
                raise Conflict(f"job {job_id} is running; cancel it first (POST /jobs/{job_id}/cancel), then delete "
                               "it once it has stopped")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(folder, ignore_errors=True)

    def claim_next(self, worker: str) -> Job | None:
        """The oldest queued job, now marked running for `worker` (jobs run in submission order)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, runs = runs + 1, "
                       "started_at = COALESCE(started_at, ?) WHERE id = ?", (worker, time.time(), row[0]))
        return self.get(row[0])

    def requeue_interrupted(self) -> list[str]:
        """Jobs left running by a server that died go back to the queue (in their place); they resume from their
        last checkpoint. Only the holder of the runner lock may call this."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
            db.execute("UPDATE jobs SET state = 'queued', worker = NULL WHERE state = 'running'")
        return ids

    def update(self, job_id: str, **fields) -> None:
        """Progress, plan, chunk count, seed... of a running job (JSON-encoded where needed)."""
        for name in ("progress", "plan"):
            if name in fields:
                fields[name] = json.dumps(fields[name])
        names = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, state: str, **fields) -> None:
        if state not in FINAL_STATES:
            raise ValueError(state)
        self.update(job_id, state=state, finished_at=time.time(), **fields)

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            self._work.wait(timeout)

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def sweep_orphans(self) -> int:
        """Remove job folders whose row never got written (a submission killed half-way) or was deleted."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT id FROM jobs")}
        removed = 0
        for folder in self.jobs_dir.iterdir():
            if folder.name in known or time.time() - folder.stat().st_mtime < ORPHAN_AGE_S:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        return removed

    def _row(self, db: sqlite3.Connection, job_id: str) -> Job:
        self.folder(job_id)
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_row(row)


# ------------------------------------------------------------------------------------------------------- helpers

def _source_name(source: Source, fallback: str) -> str:
    if isinstance(source, tuple):
        return display_name(source[0], fallback)
    return display_name(Path(source).name, fallback)


def _copy(source: Source, dest: Path, budget: int, label: str, limit: int) -> int:
    if isinstance(source, tuple):
        return copy_upload(source[1], dest, budget, label, limit)
    return copy_file(Path(source), dest, budget, label, limit)


def _requested(request: GenerateOptions) -> dict:
    return {k: v for k, v in to_dict(request).items() if k not in SERVER_FIELDS}


def plan_job(request: GenerateOptions, inputs: dict, limits: Limits) -> dict:
    """The plan `generate` will run (chunks from the decoded audio length), or a refusal naming the option."""
    from ..media.audio import SAMPLE_RATE
    from ..media.frames import person_masks_source
    from ..pipeline import InfiniteTalkPipeline, check_resumable
    from ..sampling.windows import FPS

    samples = [inputs[k]["samples_16k"] for k in ("audio", "audio2") if k in inputs]
    if len(samples) == 2 and request.audio_mode == "add":
        total = sum(samples)
    else:
        total = max(samples)
    if total / SAMPLE_RATE > limits.max_audio_seconds:
        raise UploadRefused(f"audio: {total / SAMPLE_RATE:.1f} s of speech in this job ({request.audio_mode} mode) is "
                            f"over this server's limit of {limits.max_audio_seconds:.0f} s (--max-audio-seconds)")
    ref = inputs["reference"]
    request = dataclasses.replace(request, **{ref["kind"]: ref["file"]})  # defaults that follow the reference's kind
    try:
        check_resumable(request, None, 0)
        if request.bbox is not None:
            person_masks_source(ref["height"], ref["width"], len(samples), request.bbox)
        plan = InfiniteTalkPipeline().plan_request(request, int(total / SAMPLE_RATE * FPS))
    except (InputError, OptionError) as err:
        raise UploadRefused(f"options: {err}") from None
    plan["speakers"] = len(samples)
    plan["reference"] = ref["kind"]
    return plan

