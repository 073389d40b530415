"""The job service under torchrun (2 processes, gloo, CPU, tiny preset): rank 0 serves the API and runs every job's
transformer calls on both processes, job after job (a cancelled one included); the frames equal one process's; only
rank 0 writes; SIGTERM to torchrun ends both processes cleanly (a running job resumes at the next start); a process
that dies mid-job fails that job with the message and stops the service; --workers > 1 is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from infinite_talk.cli import main as cli_main  # noqa: E402
from infinite_talk.media.mp4 import probe_media  # noqa: E402
from infinite_talk.options import GenerateOptions, LoadOptions  # noqa: E402
from infinite_talk.pipeline import InfiniteTalkPipeline  # noqa: E402
from infinite_talk.service.store import JobStore  # noqa: E402
from infinite_talk.testing.service import wait_until_healthy  # noqa: E402

TESTS = Path(__file__).parent
EXAMPLES = TESTS / "data" / "examples"
RANK_SCRIPT = TESTS / "parallel_serve.py"
MODEL = ["--preset", "tiny", "--model-precision", "fp32", "--vae-precision", "fp32"]
# 25 frames (1 s) in 2 chunks of 21 frames; the second job with 3 passes per step and TeaCache
JOBS = [{"steps": 3, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 21, "motion_frames": 5, "max_seconds": 1.0,
         "seed": 5},
        {"steps": 2, "frame_num": 21, "motion_frames": 5, "max_seconds": 1.0, "seed": 7, "step_cache": "teacache"}]
LONG_JOB = {"steps": 2, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 21, "motion_frames": 5,
            "max_seconds": 5.0}  # 8 chunks
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    # one thread per process: two processes share this machine's cores (the reference runs with one thread too)
    return dict(os.environ, INFINITE_TALK_CACHE=str(cache), OMP_NUM_THREADS="1")


class Ranks:
    """The processes' logs, exit codes and folders (tests/parallel_serve.py) under `root`."""

    def __init__(self, root: Path, port: int):
        self.root, self.url = root, f"http://127.0.0.1:{port}"

    def log(self, rank: int) -> str:
        path = self.root / f"rank-{rank}.log"
        return path.read_text() if path.exists() else ""

    def exit_code(self, rank: int) -> int | None:
        path = self.root / f"rank-{rank}.exit"
        return int(path.read_text()) if path.exists() else None

    def pid(self, rank: int) -> int:
        return int((self.root / f"rank-{rank}.pid").read_text())

    def folder(self, rank: int) -> Path:
        return self.root / f"rank-{rank}"

    def wait_up(self, procs: list[subprocess.Popen]) -> None:
        why = wait_until_healthy(self.url, procs, TIMEOUT)
        if why:
            pytest.fail(f"the service did not start ({why}):\n{self.log(0)[-3000:]}\n{self.log(1)[-3000:]}")


def _serve_args(root: Path, port: int) -> list[str]:
    return [str(RANK_SCRIPT), str(root), "serve", *MODEL, "--data-dir", "data", "--port", str(port)]


def _submit(client: httpx.Client, options: dict) -> str:
    files = {"reference": ("portrait.png", (EXAMPLES / "portrait.png").read_bytes()),
             "audio": ("speech_en.wav", (EXAMPLES / "speech_en.wav").read_bytes())}
    response = client.post("/jobs", files=files, data={"options": json.dumps(options)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _wait(client: httpx.Client, job_id: str, until) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {job}")


def _finished(job: dict) -> bool:
    return job["state"] in ("completed", "failed", "cancelled")


def _reference_digest(options: dict, out: Path) -> str:
    """sha256 over the raw frames of one process (the service's `frames_sha256`), with one thread as the service."""
    pipe = InfiniteTalkPipeline()
    pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    digest = hashlib.sha256()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe.generate(GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(EXAMPLES / "speech_en.wav"),
                                      out=str(out), **options),
                      on_chunk=lambda k, frames: digest.update(np.ascontiguousarray(frames).tobytes()))
    finally:
        torch.set_num_threads(threads)
    return digest.hexdigest()


def test_torchrun_service_runs_jobs_on_both_processes_and_stops_cleanly(cache, tmp_path):
    root, port = tmp_path / "run", _free_port()
    root.mkdir()
    ranks = Ranks(root, port)
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", *_serve_args(root, port)], env=_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        ranks.wait_up([torchrun])
        with httpx.Client(base_url=ranks.url, timeout=60) as client:
            cancelled = _submit(client, LONG_JOB)
            ids = [_submit(client, options) for options in JOBS]
            _wait(client, cancelled, lambda job: job["chunks_done"] >= 1)
            assert client.post(f"/jobs/{cancelled}/cancel").status_code in (200, 202)
            views = [_wait(client, job_id, _finished) for job_id in [cancelled, *ids]]
            videos = [client.get(f"/jobs/{job_id}/video").content for job_id in ids]
            sidecars = [client.get(f"/jobs/{job_id}/sidecar").json() for job_id in ids]
            running = _submit(client, LONG_JOB)  # stopped mid-job below: it resumes at the next start
            _wait(client, running, lambda job: job["chunks_done"] >= 1)
        torchrun.send_signal(signal.SIGTERM)
        torchrun.communicate(timeout=60)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()

    # the cancelled job ended on both processes (its end message), and both went on to the next jobs
    assert views[0]["state"] == "cancelled" and views[0]["frames"] == 21 + 16 * (views[0]["chunks_done"] - 1)
    for view, sidecar, video, options in zip(views[1:], sidecars, videos, JOBS, strict=True):
        assert view["state"] == "completed", view
        assert sidecar["effective"]["sequence_parallel"] == "ulysses 2 × ring 1 over 2 processes (gloo)"
        path = tmp_path / f"{view['id']}.mp4"
        path.write_bytes(video)
        media = probe_media(path)
        assert view["frames"] == media.frames == 25 and media.video_duration == pytest.approx(1.0)
        assert view["frames_sha256"] == _reference_digest(options, tmp_path / f"one-{view['id']}.mp4")

    # only rank 0 wrote: the follower's own folder stays empty
    assert sorted(p.name for p in ranks.folder(0).iterdir()) == ["data"]
    assert list(ranks.folder(1).iterdir()) == []
    # SIGTERM: the running job left at its next step and waits for the next start; both processes exited 0
    assert ranks.exit_code(0) == 0 and ranks.exit_code(1) == 0, (ranks.log(0)[-3000:], ranks.log(1)[-3000:])
    for rank in (0, 1):
        assert "Traceback" not in ranks.log(rank) and "error:" not in ranks.log(rank), ranks.log(rank)[-3000:]
    assert f"job {running} stopped with the server; it resumes from its last chunk at the next start" in ranks.log(0)
    assert ranks.log(0).rstrip().endswith("stopped")
    job = JobStore(ranks.folder(0) / "data").get(running)
    assert job.state == "running" and job.chunks_done >= 1  # requeued as interrupted at the next start


def test_a_process_dying_mid_job_fails_the_job_and_stops_the_service(cache, tmp_path):
    root, port = tmp_path / "run", _free_port()
    root.mkdir()
    ranks = Ranks(root, port)
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, *_serve_args(root, port)],
                              env=dict(_env(cache), **group, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in (0, 1)]
    try:
        ranks.wait_up(procs)
        with httpx.Client(base_url=ranks.url, timeout=60) as client:
            job_id = _submit(client, LONG_JOB)
            _wait(client, job_id, lambda job: job["chunks_done"] >= 1)
            os.kill(ranks.pid(1), signal.SIGKILL)
            procs[0].wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log = ranks.log(0)
    assert ranks.exit_code(0) == 2 and "Traceback" not in log, log[-3000:]
    job = JobStore(ranks.folder(0) / "data").get(job_id)
    assert job.state == "failed" and job.error.startswith("another process of the job "), job.error
    assert job.frames >= 21 and probe_media(ranks.folder(0) / "data" / "jobs" / job_id / "output.mp4").frames == \
        job.frames  # the finished chunks are kept
    assert f"error: job {job_id} left the processes of this torchrun service out of step (another process" in log
    assert "this torchrun service runs no more jobs and stops: restart it" in log
    assert list(ranks.folder(1).iterdir()) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_more_than_one_worker_is_refused_under_torchrun(tmp_path, monkeypatch, capsys, rank):
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}.items():
        monkeypatch.setenv(name, value)
    code = cli_main(["serve", *MODEL, "--workers", "2", "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == ("error: --workers 2: under torchrun the 2 processes run each job together (sequence "
                           "parallel over all their GPUs), one job at a time; use --workers 1, or start the service "
                           "without torchrun for one job per GPU")
    assert not (tmp_path / "data").exists()


# ---- the follower's messages, in one process ------------------------------------------------------------------------
class _Split:
    """What the follower's loader needs of `SequenceParallel` (no process group)."""

    ulysses, ring = 2, 1

    @staticmethod
    def describe():
        return "ulysses 2 × ring 1 over 2 processes"

    @staticmethod
    def attach(transformer):
        pass


def test_a_follower_loads_what_rank_0_loads_and_again_only_when_it_changes(cache, monkeypatch):
    from infinite_talk.follower import _Loader
    from infinite_talk.options import to_dict
    from infinite_talk.parallel import peers
    from infinite_talk.parallel.launch import World

    fp32 = to_dict(LoadOptions(preset="tiny", model_precision="fp32"))
    bf16 = to_dict(LoadOptions(preset="tiny", model_precision="bf16"))
    InfiniteTalkPipeline().load_models(LoadOptions(preset="tiny"))  # rank 0 writes the tiny files first
    messages = iter([{"op": "load", "options": fp32}, {"op": "idle"}, {"op": "end", "run": 1},
                     {"op": "load", "options": fp32}, {"op": "load", "options": bf16}, {"op": "stop"}])
    monkeypatch.setattr(peers, "_receive", lambda: next(messages))
    loader, loaded = _Loader(World(1, 2, 1), _Split()), []

    def load(options):
        loaded.append(loader(options))
        return loaded[-1]

    assert peers.follow(None, torch.device("cpu"), load) == 0
    assert loaded[0] is loaded[1] and loaded[2] is not loaded[1]  # the same options: the same weights
    assert [t.blocks[0].attn1.to_q.weight.dtype for t, _ in (loaded[0], loaded[2])] == [torch.float32, torch.bfloat16]


def test_an_idle_leader_sends_keep_alives_and_no_message_once_out_of_step(monkeypatch):
    from infinite_talk.parallel import peers
    from infinite_talk.parallel.launch import World

    sent = []
    monkeypatch.setattr(peers, "_broadcast", lambda message: sent.append(message) or message)
    leader = peers.Leader(World(0, 2, 0), _Split())
    leader.keep_alive()
    assert sent == []  # the last message is recent
    monkeypatch.setattr(peers, "KEEPALIVE_S", 0.0)
    leader.keep_alive()
    assert leader.end_run() and sent == [{"op": "idle"}, {"op": "end", "run": 0}]
    leader.in_forward = True  # a transformer call broke off: the processes are out of step
    leader.keep_alive()
    assert not leader.end_run() and not leader.close() and len(sent) == 2
