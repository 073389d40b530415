"""The job service as a real process (`infinite-talk serve --preset tiny`): kill -9 and resume with identical frames,
50 concurrent submissions, hostile uploads, cancel/delete, and the token."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from infinite_talk.testing.service import wait_until_healthy  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
TOKEN = "test-token-0123456789abcdef"
# Short chunks (21 frames: 5 of context, 16 new) at 2 steps of 1 pass: 5 s of video in 8 chunks.
LONG_JOB = {"steps": 2, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 21, "motion_frames": 5, "max_seconds": 5.0}
LONG_FRAMES, LONG_CHUNKS = 125, 8
SHORT_JOB = {"steps": 1, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 5, "motion_frames": 1,
             "max_seconds": 0.2, "seed": 1}
MAX_QUEUED = 30


class Server:
    """`infinite-talk serve` in a subprocess on a fixed port and data folder; can be killed and started again."""

    def __init__(self, root: Path, cache: Path):
        self.data = root / "data"
        self.log_path = root / "serve.log"
        self.cache = cache
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # One torch thread: the server shares 2 cores with this process, and spinning OpenMP threads that wait for
        # a core make the tiny models many times slower.
        env = {**os.environ, "INFINITE_TALK_CACHE": str(self.cache), "OMP_NUM_THREADS": "1"}
        log = open(self.log_path, "a")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infinite_talk.cli", "serve", "--preset", "tiny", "--model-precision", "fp32",
             "--vae-precision", "fp32", "--data-dir", str(self.data), "--port", str(self.port), "--token", TOKEN,
             "--max-queued", str(MAX_QUEUED), "--max-audio-seconds", "600"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        why = wait_until_healthy(self.url, [self.proc], 300)
        if why:
            pytest.fail(f"server did not start ({why}, exit code {self.proc.poll()}):\n{self.log()}")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no clean-up of any kind
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    cache = Path(os.environ.get("INFINITE_TALK_CACHE") or tmp_path_factory.mktemp("cache"))
    srv = Server(root, cache)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    speech, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    out = {"image": EXAMPLES / "portrait.png", "speech": EXAMPLES / "speech_en.wav"}
    out["short"] = folder / "short.wav"
    sf.write(out["short"], speech[: rate // 2], rate)
    raw = (EXAMPLES / "speech_en.wav").read_bytes()
    out["truncated"] = folder / "truncated.wav"
    out["truncated"].write_bytes(raw[: len(raw) // 3])
    out["empty"] = folder / "empty.wav"
    out["empty"].write_bytes(b"")
    out["text_png"] = folder / "notes.png"
    out["text_png"].write_text("these are my meeting notes, not a picture\n" * 20)
    out["text_wav"] = folder / "notes.wav"
    out["text_wav"].write_text("not a sound either\n" * 20)
    out["playlist"] = folder / "speech.wav"  # an HLS playlist naming a server file: FFmpeg must never follow it
    out["playlist"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    out["nan"] = folder / "nan.wav"
    sf.write(out["nan"], np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    from PIL import Image

    out["huge"] = folder / "huge.png"  # a real, complete 20000×20000 picture (1 bit per pixel: 50 MB to decode)
    Image.new("1", (20000, 20000)).save(out["huge"])
    out["two_hours"] = folder / "two_hours.flac"  # complete and valid, just too long (FLAC silence is tiny)
    with sf.SoundFile(out["two_hours"], "w", samplerate=8000, channels=1, subtype="PCM_16", format="FLAC") as f:
        block = np.zeros(8000 * 60, np.int16)
        for _ in range(120):
            f.write(block)
    return out


def _submit(client, files, reference="image", audio="speech", options=None, audio2=None):
    parts = {"reference": (Path(files[reference]).name, Path(files[reference]).read_bytes()),
             "audio": (Path(files[audio]).name, Path(files[audio]).read_bytes())}
    if audio2:
        parts["audio2"] = (Path(files[audio2]).name, Path(files[audio2]).read_bytes())
    return client.post("/jobs", files=parts, data={"options": json.dumps(options or {})})


def _wait(client, job_id, states=("completed", "failed", "cancelled"), timeout=300, until=None, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states or (until is not None and until(job)):
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def _decoded_frames(data: bytes, tmp: Path) -> np.ndarray:
    tmp.write_bytes(data)
    with av.open(str(tmp)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_kill_9_mid_job_then_restart_resumes_to_the_frames_of_an_unbroken_run(server, files, tmp_path, monkeypatch):
    client = server.client()
    submitted = _submit(client, files, options=LONG_JOB)  # no seed: the one drawn must survive the restart
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["chunks"] == LONG_CHUNKS and submitted.json()["options"]["seed"] is None
    _wait(client, job_id, until=lambda j: j["chunks_done"] >= 2, poll=0.05)
    server.kill()
    with pytest.raises(httpx.TransportError):
        client.get("/health")
    server.start()

    resumed = _wait(client, job_id)
    assert resumed["state"] == "completed", resumed
    assert resumed["runs"] == 2 and 2 <= resumed["resumed_from_chunk"] < LONG_CHUNKS
    assert resumed["chunks_done"] == LONG_CHUNKS and resumed["frames"] == LONG_FRAMES
    sidecar = client.get(f"/jobs/{job_id}/sidecar").json()
    seed = resumed["seed"]
    assert sidecar["seed"] == seed and sidecar["effective"]["seed"] == seed
    assert sidecar["requested"]["seed"] is None and sidecar["status"] == "completed"
    assert sidecar["output"]["resumed_from_chunk"] == resumed["resumed_from_chunk"]
    assert sidecar["output"]["chunks_done"] == LONG_CHUNKS
    assert sidecar["effective"]["model_calls_per_chunk"] == [2] * LONG_CHUNKS  # counted over both runs
    assert sidecar["requested"]["image"] == "portrait.png"  # client names, never the server's paths
    assert not (server.data / "jobs" / job_id / "checkpoint").exists()  # chunk files go once the mp4 is written
    video = _decoded_frames(client.get(f"/jobs/{job_id}/video").content, tmp_path / "resumed.mp4")
    assert video.shape == (LONG_FRAMES, 80, 80, 3)

    # The same request run straight through by the pipeline, in this process, with the seed the job recorded.
    # Its generated frames must be the job's, bit for bit (the frames' digest; x264 itself may encode identical
    # frames slightly differently from one run to the next, so the mp4s are not compared byte for byte).
    from infinite_talk.options import GenerateOptions, LoadOptions
    from infinite_talk.pipeline import InfiniteTalkPipeline

    monkeypatch.setenv("INFINITE_TALK_CACHE", str(server.cache))
    pipe = InfiniteTalkPipeline()
    pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    digest, frames = hashlib.sha256(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server: the thread count changes the order of float sums, so the last bits
    try:
        result = pipe.generate(GenerateOptions(image=str(files["image"]), audio=str(files["speech"]), seed=seed,
                                               out=str(tmp_path / "unbroken.mp4"), **LONG_JOB),
                               on_chunk=lambda k, f: (digest.update(f.tobytes()), frames.append(len(f))))
    finally:
        torch.set_num_threads(threads)
    assert result.frames == LONG_FRAMES and len(frames) == LONG_CHUNKS
    assert resumed["frames_sha256"] == digest.hexdigest()
    assert sidecar["effective"]["model_calls"] == result.sidecar["effective"]["model_calls"]


def test_fifty_concurrent_submissions_are_accepted_or_refused_and_none_is_lost(server, files):
    client = server.client()
    before = {j["id"] for j in client.get("/jobs", params={"limit": 1000}).json()["jobs"]}
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: _submit(client, files, audio="short", options=SHORT_JOB), range(50)))
    accepted = [a.json()["id"] for a in answers if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    for answer in refused:
        assert answer.status_code == 429, answer.text
        assert "the queue is full" in answer.json()["error"]
    assert len(accepted) + len(refused) == 50 and len(set(accepted)) == len(accepted) >= MAX_QUEUED
    listed = {j["id"] for j in client.get("/jobs", params={"limit": 1000}).json()["jobs"]}
    assert set(accepted) <= listed and len(listed - before) == len(accepted)  # no refused job half-created
    for job_id in accepted:
        job = _wait(client, job_id)
        assert job["state"] == "completed" and job["frames"] == 5, job
    video = client.get(f"/jobs/{accepted[-1]}/video")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(list((server.data / "jobs").iterdir())) == len(listed)


MALFORMED = [
    ({"audio": "truncated"}, "truncated.wav): the wav file is truncated"),
    ({"audio": "empty"}, "audio (empty.wav): the file is empty (0 bytes)"),
    ({"reference": "empty"}, "reference (empty.wav): the file is empty (0 bytes)"),
    ({"reference": "text_png"}, "reference (notes.png): not a picture or a video"),
    ({"reference": "huge"}, "reference (huge.png): the image is larger than this server accepts"),
    ({"audio": "two_hours"}, "audio (two_hours.flac): 7200.0 s of audio is over this server's limit of 600 s"),
    ({"audio": "nan"}, "audio (nan.wav): audio contains NaN or infinite samples"),
    ({"audio": "text_wav"}, "audio (notes.wav): cannot decode audio"),
    ({"audio2": "nan"}, "audio2 (nan.wav): audio contains NaN"),
    ({"audio": "playlist"}, "audio (speech.wav): cannot decode audio: the file is text"),
    ({"options": {"stepz": 4}}, "unknown option(s) for GenerateOptions: stepz"),
    ({"options": {"image": "/etc/passwd"}}, "options: image cannot be set"),
    ({"options": {"steps": "many"}}, "options: steps: 'many' must be a whole number"),
    ({"options": {"steps": 0}}, "steps: 0 is outside [1, 1000]"),
    ({"options": {"scheduler": "magic"}}, "scheduler: unknown value 'magic'"),
    ({"options": {"frame_num": 9, "motion_frames": 5}}, "frame_num - motion_frames >= motion_frames"),
    ({"options": {"bbox": [[0, 0, 600, 100]]}}, "lies outside the 512×512 reference image"),
]


def test_malformed_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(server, files):
    client = server.client()
    jobs_before = len(client.get("/jobs", params={"limit": 1000}).json()["jobs"])
    for case, message in MALFORMED:
        answer = _submit(client, files, **case)
        assert 400 <= answer.status_code < 500, (case, answer.status_code, answer.text)
        assert message in answer.json()["error"], (case, answer.json())
        assert "Traceback" not in answer.text and str(server.data) not in answer.text
    raw = client.post("/jobs", files={"reference": ("p.png", files["image"].read_bytes())},
                      data={"options": "{not json"})
    assert raw.status_code == 422 and "audio" in raw.json()["error"]
    nan = client.post("/jobs", files={"reference": ("p.png", files["image"].read_bytes()),
                                      "audio": ("s.wav", files["short"].read_bytes())}, data={"options": '{"shift": NaN}'})
    assert nan.status_code == 422 and "NaN is not a number JSON allows" in nan.json()["error"]
    assert client.get("/jobs/../../etc/passwd").status_code == 404
    assert client.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA").json()["error"] == "no job 'AAAAAAAAAAAAAAAAAAAAAA'"
    assert client.get("/health").json()["status"] == "ok"
    assert len(client.get("/jobs", params={"limit": 1000}).json()["jobs"]) == jobs_before  # nothing half-made
    ok = _submit(client, files, audio="short", options=SHORT_JOB)
    assert ok.status_code == 201 and _wait(client, ok.json()["id"])["state"] == "completed"


def test_cancel_keeps_the_finished_chunks_and_delete_removes_the_job(server, files, tmp_path):
    client = server.client()
    running = _submit(client, files, options={**LONG_JOB, "seed": 3}).json()
    queued = _submit(client, files, options={**LONG_JOB, "seed": 4}).json()
    _wait(client, running["id"], until=lambda j: j["chunks_done"] >= 1)
    busy = client.delete(f"/jobs/{running['id']}")
    assert busy.status_code == 409 and "cancel it first" in busy.json()["error"]
    first = client.post(f"/jobs/{queued['id']}/cancel")
    assert first.status_code == 200 and first.json()["state"] == "cancelled"  # never started: at once
    second = client.post(f"/jobs/{running['id']}/cancel")
    assert second.status_code == 202 and second.json()["cancel_requested"] is True
    job = _wait(client, running["id"])
    assert job["state"] == "cancelled" and 0 < job["frames"] < LONG_FRAMES, job
    frames = _decoded_frames(client.get(f"/jobs/{running['id']}/video").content, tmp_path / "cancelled.mp4")
    assert frames.shape[0] == job["frames"]
    assert client.post(f"/jobs/{running['id']}/cancel").status_code == 409
    assert client.get(f"/jobs/{queued['id']}/video").status_code == 404
    for job_id in (running["id"], queued["id"]):
        assert client.delete(f"/jobs/{job_id}").json() == {"deleted": job_id}
        assert client.get(f"/jobs/{job_id}").status_code == 404
        assert not (server.data / "jobs" / job_id).exists()


def test_requests_without_the_token_get_401(server, files):
    job_id = "AAAAAAAAAAAAAAAAAAAAAA"
    routes = [("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/video"),
              ("GET", f"/jobs/{job_id}/sidecar"), ("POST", f"/jobs/{job_id}/cancel"), ("DELETE", f"/jobs/{job_id}")]
    for token in (None, "wrong-token-0123456789abcdef"):
        client = server.client(token)
        for method, path in routes:
            answer = client.request(method, path)
            assert answer.status_code == 401, (token, method, path)
            assert "Authorization: Bearer TOKEN" in answer.json()["error"]
        refused = _submit(client, files, audio="short", options=SHORT_JOB)
        assert refused.status_code == 401
    assert server.client().get("/jobs").status_code == 200
