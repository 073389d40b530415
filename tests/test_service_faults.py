"""Storage faults under a running job (the tiny models, in-process worker): the database locked by another process
for longer than the busy timeout, a disk that fills (a real tmpfs where this machine allows mounting, else an injected
ENOSPC) and a read-only data folder (injected EROFS / SQLITE_READONLY: a mount cannot be made read-only while the
database is open on it). Each time the job neither fails nor stays 'running' unnoticed: /health says storage is
unavailable, reads keep answering, and once storage is back the job completes with the frames of an undisturbed
run (frames_sha256)."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from infinite_talk.options import LoadOptions  # noqa: E402
from infinite_talk.pipeline import InfiniteTalkPipeline  # noqa: E402
from infinite_talk.service import checkpoint as checkpoint_module  # noqa: E402
from infinite_talk.service.api import create_app  # noqa: E402
from infinite_talk.service.store import JobStore  # noqa: E402
from infinite_talk.service.worker import Worker  # noqa: E402
from infinite_talk.testing.service import LOCK_DATABASE  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
JOB = {"steps": 2, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 9, "motion_frames": 1, "max_seconds": 1.0,
       "seed": 11}  # 25 frames in 3 chunks
WAIT_S = 120  # upper bounds for waits that normally take a few seconds (a shared, loaded machine)


@pytest.fixture(scope="module")
def pipe(cache):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same for every run of this module: the thread count changes float sums
    pipeline = InfiniteTalkPipeline()
    pipeline.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    yield pipeline
    torch.set_num_threads(threads)


class Service:
    """A store, one worker on the tiny pipeline, and the API over them (no token, loopback)."""

    def __init__(self, data: Path, pipeline, **store_options):
        self.store = JobStore(data, **store_options)
        self.stop = threading.Event()
        self.worker = Worker(self.store, pipeline, "worker-0", self.stop, retry_first_s=0.1, retry_max_s=0.5)
        self.client = TestClient(create_app(self.store, None, [self.worker]), base_url="http://127.0.0.1:8000")

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.stop.set()
        self.store.wake()
        self.worker.join(WAIT_S)
        self.store.close()

    def submit(self) -> str:
        return self.store.submit(EXAMPLES / "portrait.png", EXAMPLES / "speech_en.wav", options=JOB).id

    def wait(self, what, condition, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{what}: not within {timeout} s; health {self.client.get('/health').json()}")

    def finished(self, job_id: str) -> dict:
        return self.wait(f"job {job_id} finished", lambda: (lambda j: j if j["state"] in ("completed", "failed",
                         "cancelled") else None)(self.client.get(f"/jobs/{job_id}").json()))

    def storage_down(self) -> dict:
        return self.wait("health reports the storage fault", lambda: (lambda h: h if h["status"] == "degraded"
                         else None)(self.client.get("/health").json()))


@pytest.fixture
def service_factory(pipe):
    made = []

    def make(data: Path, **store_options) -> Service:
        made.append(Service(data, pipe, **store_options))
        return made[-1]

    yield make
    for service in made:
        service.close()


@pytest.fixture(scope="module")
def undisturbed(pipe, tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("undisturbed") / "data", pipe)
    try:
        service.start()
        job = service.finished(service.submit())
    finally:
        service.close()
    assert job["state"] == "completed" and job["frames"] == 25 and job["runs"] == 1, job
    return job


def _after_first_chunk(monkeypatch, action):
    """Run `action` once, right after the first chunk's checkpoint is saved (between chunks 1 and 2)."""
    save = checkpoint_module.JobCheckpoint.save
    done = []

    def save_then_act(self, state, frames):
        save(self, state, frames)
        if not done:
            done.append(True)
            action()

    monkeypatch.setattr(checkpoint_module.JobCheckpoint, "save", save_then_act)


def test_database_locked_by_another_process(service_factory, undisturbed, tmp_path, monkeypatch):
    service = service_factory(tmp_path / "data", busy_timeout_s=0.2, write_patience_s=0.5)
    locker = []

    def lock():
        locker.append(subprocess.Popen([sys.executable, "-c", LOCK_DATABASE, str(service.store.root / "jobs.sqlite3")],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        assert locker[0].stdout.readline().strip() == "held"

    _after_first_chunk(monkeypatch, lock)
    job_id = service.submit()
    service.start()
    try:
        service.wait("the lock is taken", lambda: locker)
        health = service.storage_down()  # the job's end cannot be written while the lock is held
        worker = health["workers"][0]
        assert worker["state"] == "storage unavailable, retrying" and worker["job"] == job_id
        assert "the job database is locked by another process" in worker["error"] and worker["retries"] >= 1
        t = time.monotonic()
        read = service.client.get(f"/jobs/{job_id}")
        waited = time.monotonic() - t
        assert read.status_code == 200 and read.json()["state"] == "running"
        listed = service.client.get("/jobs")
        assert listed.status_code == 200 and [j["id"] for j in listed.json()["jobs"]] == [job_id]
        refused = service.client.post("/jobs", files={
            "reference": ("p.png", (EXAMPLES / "portrait.png").read_bytes()),
            "audio": ("s.wav", (EXAMPLES / "speech_en.wav").read_bytes())})
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert "the job database is locked by another process" in refused.json()["error"]
        assert locker[0].poll() is None  # all of the above answered while the other process held the lock
        print(f"\nreads answered in {waited * 1000:.1f} ms while another process held the write lock; "
              f"{worker['retries']} retries so far")
        assert list((service.store.jobs_dir).iterdir()) == [service.store.folder(job_id)]  # the refused one left
    finally:
        for proc in locker:
            proc.communicate("\n", timeout=WAIT_S)
    job = service.finished(job_id)
    assert job["state"] == "completed" and job["runs"] == 1, job
    assert job["frames_sha256"] == undisturbed["frames_sha256"]
    assert service.client.get("/health").json()["status"] == "ok"


def _can_mount(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs, room for the request check's estimate of a tiny job (None where mounting is not allowed)."""
    mount = tmp_path / "disk"
    if not _can_mount(mount):
        yield None
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        block = b"\0" * 2**16
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return ballast


class Injected:
    """Storage writes fail while `on`: the checkpoint's files with `OSError(code)` and the database's write
    transactions with the SQLite error a full or read-only disk gives."""

    def __init__(self, monkeypatch, store: JobStore, code: int):
        self.on = False
        self.raised = 0
        sqlite_code, text = {errno.ENOSPC: (13, "database or disk is full"),
                             errno.EROFS: (8, "attempt to write a readonly database")}[code]
        write_whole, begin = checkpoint_module._write_whole, type(store)._tx

        def failing_write(path, data):
            if self.on:
                self.raised += 1
                raise OSError(code, os.strerror(code), str(path))
            return write_whole(path, data)

        def failing_tx(this):
            if self.on:
                self.raised += 1
                err = sqlite3.OperationalError(text)
                err.sqlite_errorcode = sqlite_code
                raise err
            return begin(this)

        monkeypatch.setattr(checkpoint_module, "_write_whole", failing_write)
        monkeypatch.setattr(type(store), "_tx", failing_tx)


def test_disk_fills_then_frees(service_factory, undisturbed, small_disk, tmp_path, monkeypatch):
    data = (small_disk or tmp_path) / "data"
    service = service_factory(data)
    if small_disk is not None:
        filled = []
        _after_first_chunk(monkeypatch, lambda: filled.append(_fill(small_disk)))
    else:
        injected = Injected(monkeypatch, service.store, errno.ENOSPC)
        _after_first_chunk(monkeypatch, lambda: setattr(injected, "on", True))
    job_id = service.submit()
    service.start()
    health = service.storage_down()
    worker = health["workers"][0]
    assert worker["state"] == "storage unavailable, retrying" and "the disk is full" in worker["error"], health
    job = service.client.get(f"/jobs/{job_id}").json()
    assert job["state"] in ("queued", "running"), job  # never failed
    assert (data / "jobs" / job_id / "checkpoint" / "state.pt").is_file()  # chunk 1 is kept
    service.wait("a few retries", lambda: service.worker.retries >= 3)
    retries = service.worker.retries
    if small_disk is not None:
        filled[0].unlink()
    else:
        injected.on = False
    job = service.finished(job_id)
    assert job["state"] == "completed" and job["runs"] == 2 and job["resumed_from_chunk"] >= 1, job
    assert job["frames_sha256"] == undisturbed["frames_sha256"]
    assert not (data / "jobs" / job_id / "checkpoint").exists()
    print(f"\ndisk full ({'tmpfs' if small_disk else 'injected ENOSPC'}): {retries} retries, resumed from chunk "
          f"{job['resumed_from_chunk']}, frames identical")


def test_read_only_data_folder_then_writable(service_factory, undisturbed, tmp_path, monkeypatch):
    service = service_factory(tmp_path / "data")
    injected = Injected(monkeypatch, service.store, errno.EROFS)
    _after_first_chunk(monkeypatch, lambda: setattr(injected, "on", True))
    job_id = service.submit()
    service.start()
    health = service.storage_down()
    assert "the data folder is read-only" in health["workers"][0]["error"], health
    service.wait("a few retries", lambda: service.worker.retries >= 3)
    job = service.client.get(f"/jobs/{job_id}").json()
    assert job["state"] == "running", job  # the row cannot change; health says why
    injected.on = False
    job = service.finished(job_id)
    assert job["state"] == "completed" and job["runs"] == 2 and job["resumed_from_chunk"] >= 1, job
    assert job["frames_sha256"] == undisturbed["frames_sha256"]
    assert injected.raised >= 3
    service.wait("the worker idle again", lambda: service.client.get("/health").json()["workers"][0]["state"]
                 == "idle")


def test_a_job_its_worker_lost_to_a_fault_goes_back_to_the_queue(service_factory, undisturbed, tmp_path,
                                                                 monkeypatch):
    """A fault around the job's run (its first row write) gives the job back; it runs again, not 'running' forever."""
    service = service_factory(tmp_path / "data")
    update, failures = JobStore.update, []

    def failing_update(self, job_id, patience_s=None, **fields):
        if "plan" in fields and len(failures) < 2:
            failures.append(job_id)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return update(self, job_id, patience_s, **fields)

    monkeypatch.setattr(JobStore, "update", failing_update)
    job_id = service.submit()
    service.start()
    job = service.finished(job_id)
    assert failures == [job_id, job_id]
    assert job["state"] == "completed" and job["runs"] == 3 and job["error"] is None, job
    assert job["frames_sha256"] == undisturbed["frames_sha256"]
