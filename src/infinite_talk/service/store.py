"""The job queue: one SQLite database and one folder per job under the data folder.

Every state change is one transaction (`BEGIN IMMEDIATE`), so a killed server leaves each job either before or after
a change, never between. Writes go through one connection (one writer at a time, as SQLite allows); reads use a
small pool of their own connections and, in WAL mode, never wait for a writer, nor for another process' lock.
Storage faults (a database locked by another process, a full disk, a read-only folder, I/O errors) are
`StorageUnavailable` (HTTP 503) after a bounded retry; `storage_fault` tells them from other errors. Job ids are
`secrets.token_urlsafe(16)` (128 random bits); a job's files live in `jobs/<id>/` (0700, files 0600) under names the
server chooses. `JobStore.submit` is the one way in, for the HTTP API and for any in-process front end (the web UI):
it copies and validates the inputs and plans the job before it is queued, holding a lock on the new folder until its
row is written, so that a start can tell a dead submission's folder from a live one (`recover_at_start`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import queue
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import InfiniteTalkError, InputError, OptionError, StorageError
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

log = logging.getLogger(__name__)
ID_PATTERN = r"[A-Za-z0-9_-]{22}"
FINAL_STATES = ("completed", "failed", "cancelled")
SUBMITTING = ".submitting"  # locked (flock) by the process that fills a new job folder, until its row is written
ORPHAN_AGE_S = 60  # a job folder without a row or a live submitter, this old, is a leftover (a killed delete)
DISCARDED = ".discarded"  # a folder renamed so, then removed: a kill half-way leaves a name the next start removes
CHECKPOINT_DIR = "checkpoint"
BUSY_TIMEOUT_S = 5.0  # SQLite waits this long for another writer's lock before it reports "database is locked"
WRITE_PATIENCE_S = 10.0  # a request's write retries storage faults this long, then answers 503
READERS = 4  # read connections (each a few file descriptors)
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600

# SQLite primary result codes that a later attempt may not get (https://sqlite.org/rescode.html)
TRANSIENT_SQLITE = {5: "the job database is locked by another process", 6: "the job database is locked",
                    8: "the data folder is read-only", 10: "disk I/O error", 13: "the disk is full",
                    14: "the job database cannot be opened", 15: "the job database is locked"}
STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the data folder is read-only", errno.EIO: "disk I/O error",
                  errno.EACCES: "the data folder is not writable", errno.EPERM: "the data folder is not writable",
                  errno.EMFILE: "too many open files", errno.ENFILE: "too many open files in the system"}

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


class StorageUnavailable(InfiniteTalkError):
    """The data folder or the job database cannot be used right now (it may be back in a moment)."""

    status = 503

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message  # the fault itself, without the advice


def storage_fault(err: BaseException | None) -> str | None:
    """Why `err` (or an error it was raised from) is a storage fault that may pass, in words without paths; None
    for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, StorageUnavailable):
            return err.reason
        if isinstance(err, StorageError):  # found by the request check, before the run
            return f"{STORAGE_ERRNOS.get(err.errno, 'the job folder cannot be written')} (checked before the run)"
        if isinstance(err, sqlite3.Error):
            code = getattr(err, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in TRANSIENT_SQLITE:
                return f"{TRANSIENT_SQLITE[code & 0xFF]} ({err})"
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return f"{STORAGE_ERRNOS[err.errno]} ({err.strerror or os.strerror(err.errno)})"
        err = err.__cause__ or err.__context__
    return None


def discard(path: Path) -> None:
    """Remove a folder so that a kill half-way leaves nothing used: renamed first (atomic), then deleted; the next
    start removes what a kill left (`JobStore.recover_at_start`). Idempotent."""
    if path.exists():
        doomed = path.with_name(f"{path.name}{DISCARDED}-{secrets.token_hex(4)}")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
        path = doomed
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def without_paths(text: str, *roots: Path | str) -> str:
    """`text` with every path under one of `roots` (the data folder, the temporary folder...) cut to its base name,
    and a root itself unnamed."""
    def short(match: re.Match) -> str:
        rest = (match.group(1) or "").rstrip("/")
        return rest.rsplit("/", 1)[-1] if rest else "a server folder"

    for root in sorted({str(r).rstrip("/") for r in roots if str(r).startswith("/")} - {""}, key=len,
                       reverse=True):
        text = re.sub(re.escape(root) + r"(/[^\s'\",;()\]]*)?(?![\w.-])", short, text)
    return text


def _private(path: Path, mode: int) -> None:
    """Only this user may read it (best effort: a folder another user owns and shares with us stays as it is)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.chmod(path, mode)


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

    def __init__(self, data_dir: str | Path, limits: Limits | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 write_patience_s: float = WRITE_PATIENCE_S):
        self.root = Path(data_dir).resolve()
        self.jobs_dir = self.root / "jobs"
        self.limits = limits or Limits()
        self.busy_timeout_s, self.write_patience_s = busy_timeout_s, write_patience_s
        self._write_lock = threading.Lock()  # writers only: readers have their own connections
        self._writer: sqlite3.Connection | None = None
        self._readers: queue.LifoQueue = queue.LifoQueue()
        self._reader_count = 0
        self._readers_lock = threading.Lock()
        self._work = threading.Condition()
        self._lock_file = None
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True, mode=PRIVATE_DIR)
            self.jobs_dir.mkdir(exist_ok=True, mode=PRIVATE_DIR)
            _private(self.jobs_dir, PRIVATE_DIR)
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            self._writer = db
            for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
                _private(self.root / name, PRIVATE_FILE)
        except (OSError, sqlite3.Error) as err:
            raise OptionError(f"data folder {self.root}: cannot open the job database there ({err}); check the path "
                              "and its permissions, or choose another --data-dir") from None

    # ----------------------------------------------------------------------------------------------- plumbing

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "jobs.sqlite3", timeout=self.busy_timeout_s, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
        return db

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction on the writer connection (reopened after a storage fault)."""
        with self._write_lock:
            if self._writer is None:
                self._writer = self._connect()
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as err:
                if storage_fault(err):
                    with contextlib.suppress(sqlite3.Error):
                        db.close()
                    self._writer = None
                raise

    def _write(self, change, patience_s: float | None = None):
        """`change(db)` in one transaction; storage faults are retried with backoff for `patience_s` (default:
        `write_patience_s`), then raised as `StorageUnavailable`."""
        deadline = time.monotonic() + (self.write_patience_s if patience_s is None else patience_s)
        delay = 0.05
        while True:
            try:
                with self._tx() as db:
                    return change(db)
            except (sqlite3.Error, OSError) as err:
                why = storage_fault(err)
                if why is None:
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(f"the job database cannot be written now: {why}; try again in a few "
                                             "seconds", why) from None
                if delay == 0.05:
                    log.warning("job database: %s; retrying for up to %.0f s", why, deadline - time.monotonic())
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextlib.contextmanager
    def _read(self):
        """A read connection of the pool (WAL: reads see the last commit and never wait for a writer)."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            with self._readers_lock:
                fresh = self._reader_count < READERS
                self._reader_count += fresh
            db = None
            if fresh:
                try:
                    db = self._connect()
                except (sqlite3.Error, OSError) as err:
                    with self._readers_lock:
                        self._reader_count -= 1
                    why = storage_fault(err) or str(err)
                    raise StorageUnavailable(f"the job database cannot be read now: {why}; try again in a few "
                                             "seconds", why) from None
            else:
                db = self._readers.get()
        broken = None
        try:
            yield db
        except (sqlite3.Error, OSError) as err:
            broken = storage_fault(err)
            if broken is None:
                raise
            raise StorageUnavailable(f"the job database cannot be read now: {broken}; try again in a few seconds",
                                     broken) from None
        finally:
            if broken is None:
                self._readers.put(db)  # back to the pool, whatever the caller raised
            else:  # a fresh connection next time
                with contextlib.suppress(sqlite3.Error):
                    db.close()
                with self._readers_lock:
                    self._reader_count -= 1

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break

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

    def release_runner_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

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
        fields are unset. Raises `UploadRefused` (with the fix), `QueueFull`, `StorageUnavailable`.
        """
        request = self._request(options)
        with self._read() as db:
            self._check_capacity(db)
        job_id = secrets.token_urlsafe(16)
        folder = self.jobs_dir / job_id
        marker = None
        try:
            folder.mkdir(mode=PRIVATE_DIR)
            marker = open(folder / SUBMITTING, "w")  # noqa: SIM115 - held (locked) until the row is written
            fcntl.flock(marker, fcntl.LOCK_EX)
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
                _private(folder / checked["file"], PRIVATE_FILE)
                inputs[field] = {"name": name or field, **checked}
            plan = plan_job(request, inputs, self.limits)
            now = time.time()

            def insert(db):
                self._check_capacity(db)
                db.execute("INSERT INTO jobs (id, state, created_at, options, inputs, plan) VALUES (?, ?, ?, ?, ?, ?)",
                           (job_id, "queued", now, json.dumps(_requested(request)), json.dumps(inputs),
                            json.dumps(plan)))

            self._write(insert)
        except BaseException as err:
            discard(folder)
            why = storage_fault(err)
            if why is not None and not isinstance(err, StorageUnavailable):
                raise StorageUnavailable(f"the job's files cannot be stored now: {why}; try again later", why) \
                    from None
            raise
        finally:
            if marker is not None:
                with contextlib.suppress(OSError):  # while still locked: a sweep that finds it leaves the folder
                    os.unlink(folder / SUBMITTING)
                marker.close()
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
        (active,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
        if active >= self.limits.max_queued:
            raise QueueFull(f"the queue is full ({active} jobs waiting or running, limit {self.limits.max_queued}); "
                            "submit again when some have finished")

    # -------------------------------------------------------------------------------------------------- reads

    def get(self, job_id: str) -> Job:
        self.folder(job_id)  # refuses malformed ids
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_row(row)

    def list(self, state: str | None = None, limit: int = 100, after: int = 0) -> list[Job]:
        """Jobs in queue order after the job with queue number `after` (paging: pass the last one's `seq`)."""
        query, args = "SELECT * FROM jobs WHERE seq > ?", [after]
        if state:
            query += " AND state = ?"
            args.append(state)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def queue_position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self._read() as db:
            (ahead,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND seq < ?",
                                  (job.seq,)).fetchone()
        return ahead

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])  # a vanished row stops the run too

    # ------------------------------------------------------------------------------------------ state changes

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops at its next step, keeping its finished chunks."""
        def change(db):
            job = self._row(db, job_id)
            if job.state == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                           (time.time(), "cancelled before it started", job_id))
            elif job.state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise Conflict(f"job {job_id} is already {job.state}; nothing to cancel")

        self._write(change)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        folder = self.folder(job_id)

        def change(db):
            job = self._row(db, job_id)
            if job.state == "running":
                raise Conflict(f"job {job_id} is running; cancel it first (POST /jobs/{job_id}/cancel), then delete "
                               "it once it has stopped")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

        self._write(change)
        discard(folder)

    def claim_next(self, worker: str, patience_s: float | None = None) -> Job | None:
        """The oldest queued job, now marked running for `worker` (jobs run in submission order)."""
        with self._read() as db:  # an idle queue takes no write lock (nor waits for another process' one)
            if db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is None:
                return None

        def claim(db):
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, runs = runs + 1, error = NULL, "
                       "started_at = COALESCE(started_at, ?) WHERE id = ?", (worker, time.time(), row[0]))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone())

        return self._write(claim, patience_s)

    def requeue(self, job_id: str, worker: str, note: str | None = None, patience_s: float | None = None) -> bool:
        """Give a running job of `worker` back to the queue, in its place (it resumes from its checkpoint)."""
        def change(db):
            return db.execute("UPDATE jobs SET state = 'queued', worker = NULL, error = ? WHERE id = ? AND "
                              "state = 'running' AND worker = ?", (note, job_id, worker)).rowcount > 0

        return self._write(change, patience_s)

    def requeue_interrupted(self) -> list[str]:
        """Jobs left running by a server that died go back to the queue (in their place); they resume from their
        last checkpoint. Only the holder of the runner lock may call this."""
        def change(db):
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
            db.execute("UPDATE jobs SET state = 'queued', worker = NULL WHERE state = 'running'")
            return ids

        return self._write(change)

    def update(self, job_id: str, patience_s: float | None = None, **fields) -> None:
        """Progress, plan, chunk count, seed... of a running job (JSON-encoded where needed)."""
        for name in ("progress", "plan"):
            if name in fields:
                fields[name] = json.dumps(fields[name])
        names = ", ".join(f"{k} = ?" for k in fields)
        self._write(lambda db: db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id)),
                    patience_s)

    def finish(self, job_id: str, state: str, patience_s: float | None = None, **fields) -> None:
        if state not in FINAL_STATES:
            raise ValueError(state)
        self.update(job_id, patience_s, state=state, finished_at=time.time(), **fields)

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            self._work.wait(timeout)

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def probe(self) -> None:
        """Raise the storage fault if the data folder cannot take a small file and the database a write now."""
        path = self.jobs_dir / f".probe-{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            try:
                os.write(fd, b"\0" * 65536)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._write(lambda db: db.execute("UPDATE jobs SET seq = seq WHERE 0"), patience_s=0)

    # -------------------------------------------------------------------------------------------- at start

    def recover_at_start(self) -> dict:
        """What a start does before any job runs (the runner lock's holder only): interrupted jobs back to the
        queue, folders of killed submissions and deletions removed, checkpoints of finished jobs removed."""
        return {"requeued": self.requeue_interrupted(), "swept": self.sweep_orphans(),
                "checkpoints_cleared": self.clear_finished_checkpoints()}

    def sweep_orphans(self) -> int:
        """Remove job folders without a row: a submission whose process died (its lock is free), a deletion or a
        removal killed half-way."""
        with self._read() as db:
            known = {r[0] for r in db.execute("SELECT id FROM jobs")}
        removed = 0
        for folder in self.jobs_dir.iterdir():
            if DISCARDED in folder.name or folder.name.startswith(".probe-"):
                discard(folder)
                removed += 1
            elif folder.name not in known and re.fullmatch(ID_PATTERN, folder.name) and self._abandoned(folder):
                discard(folder)
                removed += 1
        return removed

    def _abandoned(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / SUBMITTING, os.O_RDONLY)
        except FileNotFoundError:  # a deletion killed half-way, or a submission that has only just begun
            with contextlib.suppress(FileNotFoundError):
                return time.time() - folder.stat().st_mtime >= ORPHAN_AGE_S
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live submission
        finally:
            os.close(fd)
        with self._read() as db:  # its row may have been written just before the lock was released
            return db.execute("SELECT 1 FROM jobs WHERE id = ?", (folder.name,)).fetchone() is None

    def clear_finished_checkpoints(self) -> int:
        """Checkpoints a kill left behind after their job finished (they are removed right after it finishes)."""
        with self._read() as db:
            finished = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state IN ('completed', 'failed', "
                                                 "'cancelled')")]
        cleared = 0
        for job_id in finished:
            folder = self.jobs_dir / job_id
            leftovers = [folder / CHECKPOINT_DIR] if (folder / CHECKPOINT_DIR).exists() else []
            if folder.is_dir():
                leftovers += [p for p in folder.iterdir() if DISCARDED in p.name]
            for path in leftovers:
                discard(path)
                cleared += 1
        return cleared

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
    from ..request_plan import check_resumable, frames_for_samples, plan_request, track_samples

    samples = [inputs[k]["samples_16k"] for k in ("audio", "audio2") if k in inputs]
    total = track_samples(samples, request.audio_mode)
    if total / SAMPLE_RATE > limits.max_audio_seconds:
        raise UploadRefused(f"audio: {total / SAMPLE_RATE:.1f} s of speech in this job ({request.audio_mode} mode) is "
                            f"over this server's limit of {limits.max_audio_seconds:.0f} s (--max-audio-seconds)")
    ref = inputs["reference"]
    request = dataclasses.replace(request, **{ref["kind"]: ref["file"]})  # defaults that follow the reference's kind
    try:
        check_resumable(request, None, 0)
        if request.bbox is not None:
            person_masks_source(ref["height"], ref["width"], len(samples), request.bbox)
        plan = plan_request(request, frames_for_samples(total)).as_dict()
    except (InputError, OptionError) as err:
        raise UploadRefused(f"options: {err}") from None
    plan["speakers"] = len(samples)
    plan["reference"] = ref["kind"]
    return plan

