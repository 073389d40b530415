"""The job service in-process (no models): Host and Origin checks of a server without a token, paging, errors without
server paths, private job files, the token's form, and the clean-up a start does after kills."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from infinite_talk.cli import main as cli_main  # noqa: E402
from infinite_talk.service import store as store_module  # noqa: E402
from infinite_talk.service.api import create_app  # noqa: E402
from infinite_talk.service.checkpoint import JobCheckpoint  # noqa: E402
from infinite_talk.service.store import JobStore  # noqa: E402
from infinite_talk.service.uploads import Limits  # noqa: E402
from infinite_talk.testing.service import LOCK_DATABASE  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
TOKEN = "guard-test-token-0123456789"


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "data", Limits(max_upload_bytes=2 * 2**20, max_audio_seconds=60, max_queued=20))


def _files(short_wav):
    return {"reference": ("portrait.png", (EXAMPLES / "portrait.png").read_bytes()),
            "audio": ("short.wav", short_wav.read_bytes())}


def test_without_a_token_only_loopback_hosts_and_same_origin_writes_are_answered(store, short_wav):
    client = TestClient(create_app(store, None), base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.2"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example:8000", "attacker.example", "127.0.0.1.nip.io:8000", "0.0.0.0:8000",
                 "192.168.1.5:8000", "localhost.attacker.example", "[::1", ""):
        answer = client.get("/jobs", headers={"Host": host})
        assert answer.status_code == 403, host
        assert "answers only requests addressed to 127.0.0.1, localhost or [::1]" in answer.json()["error"]
    rebound = client.post("/jobs", files=_files(short_wav), headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403 and store.list() == []

    for origin in ("https://attacker.example", "null", "http://localhost:3000", "http://127.0.0.1:8001",
                   "http://localhost:8000"):  # another origin than the address the request went to
        answer = client.post("/jobs", files=_files(short_wav), headers={"Origin": origin})
        assert answer.status_code == 403, origin
        assert f"cross-origin request refused: a page from '{origin}'" in answer.json()["error"]
    assert store.list() == [] and list(store.jobs_dir.iterdir()) == []  # nothing was read or stored
    for method, path in (("DELETE", "/jobs/AAAAAAAAAAAAAAAAAAAAAA"), ("POST", "/jobs/AAAAAAAAAAAAAAAAAAAAAA/cancel")):
        assert client.request(method, path, headers={"Origin": "https://attacker.example"}).status_code == 403
    # Reads from another origin are harmless (the browser shows the page no answer without CORS headers).
    assert client.get("/jobs", headers={"Origin": "https://attacker.example"}).status_code == 200

    same = client.post("/jobs", files=_files(short_wav), headers={"Origin": "http://127.0.0.1:8000"})
    plain = client.post("/jobs", files=_files(short_wav))  # curl and scripts send no Origin
    assert same.status_code == plain.status_code == 201, (same.text, plain.text)
    job_id = same.json()["id"]
    assert client.post(f"/jobs/{job_id}/cancel", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    v6 = client.delete(f"/jobs/{job_id}", headers={"Host": "[::1]:8000", "Origin": "http://[::1]:8000"})
    assert v6.status_code == 200


def test_with_a_token_the_token_rules_any_host_and_origin(store, short_wav):
    client = TestClient(create_app(store, TOKEN), base_url="http://talk.example.org",
                        headers={"Authorization": f"Bearer {TOKEN}"})
    headers = {"Host": "talk.example.org", "Origin": "https://studio.example.org"}
    answer = client.post("/jobs", files=_files(short_wav), headers=headers)
    assert answer.status_code == 201, answer.text
    stranger = TestClient(create_app(store, TOKEN), base_url="http://talk.example.org")
    assert stranger.post("/jobs", files=_files(short_wav), headers=headers).status_code == 401


def test_job_list_pages_with_a_cursor(store, short_wav):
    client = TestClient(create_app(store, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    ids = [store.submit(EXAMPLES / "portrait.png", short_wav).id for _ in range(5)]
    store.cancel(ids[1])
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3
    queued = client.get("/jobs", params={"state": "queued", "limit": 3}).json()
    assert [j["id"] for j in queued["jobs"]] == [ids[0], ids[2], ids[3]] and queued["next_cursor"]
    rest = client.get("/jobs", params={"state": "queued", "limit": 3, "cursor": queued["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[4]] and rest["next_cursor"] is None
    bad = client.get("/jobs", params={"cursor": "abc"})
    assert bad.status_code == 422 and "cursor" in bad.json()["error"]


def test_api_errors_never_show_server_paths(store, short_wav, monkeypatch):
    client = TestClient(create_app(store, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"},
                        raise_server_exceptions=False)
    root = str(store.root)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(store.jobs_dir / "x" / "audio1.upload"))

    monkeypatch.setattr(store_module, "copy_upload", disk_full)
    full = client.post("/jobs", files=_files(short_wav))
    assert full.status_code == 503 and full.headers["retry-after"]
    assert "the disk is full" in full.json()["error"] and root not in full.text
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot read {store.jobs_dir / 'abc' / 'reference.png'} nor {store.root}")

    def spooled(*args, **kwargs):
        raise ValueError(f"spool file {tempfile.gettempdir()}/tmpab12cd/part is damaged; see {Path.home()}")

    monkeypatch.setattr(store, "get", broken)
    crash = client.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA")
    assert crash.status_code == 500, crash.text
    assert crash.json()["error"] == "internal error: RuntimeError: cannot read reference.png nor a server folder"
    monkeypatch.undo()
    monkeypatch.setattr(store, "list", spooled)
    listed = client.get("/jobs")
    assert listed.status_code == 500
    assert listed.json()["error"] == "internal error: ValueError: spool file part is damaged; see a server folder"
    monkeypatch.undo()

    job = store.submit(EXAMPLES / "portrait.png", short_wav)
    store.claim_next("w")
    store.finish(job.id, "failed", error=f"audio {store.folder(job.id) / 'audio1.wav'}: too quiet")
    shown = client.get(f"/jobs/{job.id}").json()["error"]
    assert shown == "audio audio1.wav: too quiet"


def test_job_files_and_folders_are_private(store, short_wav):
    job = store.submit(EXAMPLES / "portrait.png", short_wav)
    folder = store.folder(job.id)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [store.root, store.jobs_dir, folder,
                                                              *folder.iterdir(), *store.root.glob("jobs.sqlite3*")]}
    assert modes[store.root.name] == modes["jobs"] == modes[job.id] == 0o700, modes
    files = {name: mode for name, mode in modes.items() if name not in (store.root.name, "jobs", job.id)}
    assert {job.inputs["reference"]["file"], job.inputs["audio"]["file"], "jobs.sqlite3"} <= set(files)
    assert set(files.values()) == {0o600}, files
    import numpy as np
    import torch

    from infinite_talk.pipeline import ChunkState

    checkpoint = JobCheckpoint(folder)
    checkpoint.save(ChunkState(1, 2, 7, 3, torch.Generator().get_state(), torch.zeros(1, 2), {}),
                    np.zeros((3, 4, 4, 3), np.uint8))
    assert stat.S_IMODE(checkpoint.folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in checkpoint.folder.iterdir()} == {0o600}


def test_blank_or_spaced_tokens_are_refused_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INFINITE_TALK_TOKEN", raising=False)
    for token, message in (("   ", "is blank (only spaces)"), (" padded-token-0123456789 ", "has spaces"),
                           ("tab\tinside-token-0123456789", "control or non-ASCII")):
        code = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--preset", "tiny", "--token", token])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
    monkeypatch.setenv("INFINITE_TALK_TOKEN", "    ")
    code = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "the token (--token or $INFINITE_TALK_TOKEN) is blank" in err
    assert not (tmp_path / "d").exists()  # refused before anything was created


SLOW_SUBMIT = """
import sys, time
from pathlib import Path
from infinite_talk.service import store as store_module
from infinite_talk.service.store import JobStore

checked = store_module.check_audio
def slow_check(*args):
    print("validating", flush=True)
    time.sleep(60)
    return checked(*args)
store_module.check_audio = slow_check
JobStore(sys.argv[1]).submit(sys.argv[2], sys.argv[3])
"""


def test_a_start_removes_what_kills_left_half_done(store, short_wav, tmp_path):
    # 1. a process killed while it validates an upload: its job folder has no row and a free lock
    child = subprocess.Popen([sys.executable, "-c", SLOW_SUBMIT, str(store.root), str(EXAMPLES / "portrait.png"),
                              str(short_wav)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "validating"
        half = [p for p in store.jobs_dir.iterdir()]
        assert len(half) == 1 and (half[0] / store_module.SUBMITTING).exists()
        assert store.sweep_orphans() == 0  # a live submission is left alone
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # 2. a completed job whose checkpoint removal was killed half-way, and one killed before it began
    done, before = (store.submit(EXAMPLES / "portrait.png", short_wav) for _ in range(2))
    for job in (done, before):
        store.claim_next("w")
        folder = store.folder(job.id)
        (folder / "checkpoint").mkdir()
        for k in range(3):
            (folder / "checkpoint" / f"frames_{k:05d}.npy").write_bytes(b"x")
        store.finish(job.id, "completed")
    half_gone = store.folder(done.id) / "checkpoint"
    half_gone.rename(half_gone.with_name("checkpoint.discarded-1234"))
    (half_gone.with_name("checkpoint.discarded-1234") / "frames_00000.npy").unlink()
    # 3. a deletion killed half-way (its row is gone, its folder renamed)
    deleted = store.submit(EXAMPLES / "portrait.png", short_wav)
    os.rename(store.folder(deleted.id), store.jobs_dir / f"{deleted.id}.discarded-abcd")
    store._write(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (deleted.id,)))

    report = store.recover_at_start()
    assert report == {"requeued": [], "swept": 2, "checkpoints_cleared": 2}
    assert sorted(p.name for p in store.jobs_dir.iterdir()) == sorted([done.id, before.id])
    for job in (done, before):
        assert sorted(p.name for p in store.folder(job.id).iterdir()) == sorted(e["file"] for e in
                                                                                 job.inputs.values())
    assert store.recover_at_start() == {"requeued": [], "swept": 0, "checkpoints_cleared": 0}  # idempotent


def test_a_submission_racing_the_sweep_keeps_its_folder(store, short_wav, monkeypatch):
    """The sweep never takes the folder of a submission in flight, even between its row and its unlock."""
    swept = []
    original = store._write

    def write_then_sweep(change, patience_s=None):
        result = original(change, patience_s)
        swept.append(store.sweep_orphans())  # row written, lock still held
        return result

    monkeypatch.setattr(store, "_write", write_then_sweep)
    job = store.submit(EXAMPLES / "portrait.png", short_wav)
    assert swept == [0] and store.folder(job.id).is_dir()
    assert not (store.folder(job.id) / store_module.SUBMITTING).exists()
    assert store.get(job.id).inputs["audio"]["name"] == "short.wav"


def test_refusals_return_their_read_connections(tmp_path, short_wav):
    """Reads use a pool of connections; a refusal raised while one is in use must give it back."""
    store = JobStore(tmp_path / "data", Limits(max_queued=1))
    store.submit(EXAMPLES / "portrait.png", short_wav)
    for _ in range(3 * store_module.READERS):
        with pytest.raises(store_module.QueueFull):
            store.submit(EXAMPLES / "portrait.png", short_wav)
        with pytest.raises(store_module.NotFound):
            store.get("AAAAAAAAAAAAAAAAAAAAAA")
    assert len(store.list()) == 1 and store._readers.qsize() <= store_module.READERS


def test_reads_never_wait_for_a_writer_that_waits_for_the_lock(tmp_path, short_wav):
    """Another process holds the write lock; a writer of this process waits for it (busy timeout 60 s) while reads
    of every kind answer; then the lock goes and the write lands."""


    store = JobStore(tmp_path / "data", busy_timeout_s=60)
    job = store.submit(EXAMPLES / "portrait.png", short_wav)
    client = TestClient(create_app(store, None), base_url="http://127.0.0.1:8000")
    locker = subprocess.Popen([sys.executable, "-c", LOCK_DATABASE, str(store.root / "jobs.sqlite3")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "held"
        writer = threading.Thread(target=store.cancel, args=(job.id,))
        writer.start()
        while not store._write_lock.locked():  # the writer is inside its transaction attempt, waiting
            time.sleep(0.01)
        t = time.monotonic()
        answers = [client.get(f"/jobs/{job.id}"), client.get("/jobs"), client.get("/health")]
        waited = time.monotonic() - t
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert answers[0].json()["state"] == "queued" and store.get(job.id).state == "queued"
        assert writer.is_alive() and locker.poll() is None  # all answered while the writer still waits
        print(f"\n3 reads answered in {waited * 1000:.0f} ms while a writer waited for another process' lock")
    finally:
        locker.communicate("\n", timeout=60)
    writer.join(60)
    assert store.get(job.id).state == "cancelled"
