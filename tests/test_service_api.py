"""The job service in-process (no models): queue order and state changes, limits, refusals, the Python submit API,
the serve command's refusals, and a schemathesis run over the OpenAPI schema that must find no 5xx."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from infinite_talk.cli import main as cli_main  # noqa: E402
from infinite_talk.errors import OptionError  # noqa: E402
from infinite_talk.options import GenerateOptions  # noqa: E402
from infinite_talk.service.api import create_app  # noqa: E402
from infinite_talk.service.store import JobStore, QueueFull  # noqa: E402
from infinite_talk.service.uploads import Limits, UploadRefused  # noqa: E402
from infinite_talk.service.worker import request_for  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "data", Limits(max_upload_bytes=2 * 2**20, max_audio_seconds=60, max_queued=3))


@pytest.fixture
def client(store):
    return TestClient(create_app(store, TOKEN), headers=AUTH)


def _files(short_wav, **extra):
    files = {"reference": ("portrait.png", (EXAMPLES / "portrait.png").read_bytes()),
             "audio": ("short.wav", short_wav.read_bytes())}
    files.update(extra)
    return files


def test_jobs_queue_in_order_with_their_plan_and_unguessable_ids(client, store, short_wav):
    first = client.post("/jobs", files=_files(short_wav), data={"options": json.dumps({"steps": 3, "seed": 5})})
    second = client.post("/jobs", files=_files(short_wav, audio2=("two.wav", short_wav.read_bytes())),
                         data={"options": json.dumps({"audio_mode": "add", "text_scale": 1.0})})
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    a, b = first.json(), second.json()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", a["id"]) and a["id"] != b["id"]
    assert first.headers["location"] == f"/jobs/{a['id']}"
    assert (a["state"], a["queue_position"], b["queue_position"]) == ("queued", 0, 1)
    assert a["plan"]["steps"] == 3 and a["plan"]["passes_per_step"] == 3 and a["plan"]["chunks"]["frames"] == 12
    assert b["plan"]["passes_per_step"] == 2 and b["plan"]["chunks"]["frames"] == 25  # add: 0.5 s + 0.5 s
    assert a["inputs"]["reference"] == {"name": "portrait.png", "kind": "image", "format": "PNG", "width": 512,
                                        "height": 512}
    assert a["options"]["seed"] == 5 and "image" not in a["options"] and "out" not in a["options"]
    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [a["id"], b["id"]]

    claimed = store.claim_next("w0")  # submission order
    assert claimed.id == a["id"] and claimed.state == "running" and claimed.runs == 1
    request = request_for(claimed, store.folder(claimed.id))
    assert Path(request.image).parent == store.folder(claimed.id) and request.out.endswith("output.mp4")
    assert client.get("/jobs", params={"state": "running"}).json()["jobs"][0]["id"] == a["id"]
    assert client.get(f"/jobs/{b['id']}").json()["queue_position"] == 1
    assert client.get(f"/jobs/{a['id']}/video").status_code == 409
    assert store.requeue_interrupted() == [a["id"]]  # what a restart does with a killed server's running job
    assert store.claim_next("w1").id == a["id"] and store.get(a["id"]).runs == 2


def test_python_submit_api_takes_local_files(store, short_wav):
    job = store.submit(EXAMPLES / "portrait.png", short_wav, options={"steps": 2})
    assert job.state == "queued" and job.inputs["audio"]["name"] == "short.wav" and job.options["steps"] == 2
    job = store.submit(EXAMPLES / "portrait.png", short_wav, options=GenerateOptions(steps=4))
    assert job.plan["steps"] == 4
    with pytest.raises(UploadRefused, match="options: image must be unset"):
        store.submit(EXAMPLES / "portrait.png", short_wav, options=GenerateOptions(image="/etc/passwd"))
    with pytest.raises(UploadRefused, match=r"audio \(missing.wav\): no such file"):
        store.submit(EXAMPLES / "portrait.png", short_wav.parent / "missing.wav")
    store.submit(EXAMPLES / "portrait.png", short_wav)
    with pytest.raises(QueueFull, match="the queue is full"):
        store.submit(EXAMPLES / "portrait.png", short_wav)
    assert len(store.list()) == 3 and len(list(store.jobs_dir.iterdir())) == 3


def test_limits_and_refusals_are_4xx_json(client, store, short_wav, tmp_path):
    speech = np.random.default_rng(0).standard_normal(8000 * 31).astype(np.float32) * 0.1
    sf.write(tmp_path / "long.wav", speech, 8000, subtype="PCM_16")  # 31 s: twice is over the 60 s limit
    too_big = client.post("/jobs", files=_files(short_wav, audio=("big.wav", b"\0" * (3 * 2**20))))
    assert too_big.status_code == 413 and "over this server's limit of 2 MiB" in too_big.json()["error"]
    long_two = client.post("/jobs", files=_files(short_wav, audio=("a.wav", (tmp_path / "long.wav").read_bytes()),
                                                 audio2=("b.wav", (tmp_path / "long.wav").read_bytes())),
                           data={"options": '{"audio_mode": "add"}'})
    assert long_two.status_code == 422 and "62.0 s of speech in this job (add mode)" in long_two.json()["error"]
    head = b'--x\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
    chunked = client.post("/jobs", content=(part for part in [head] + [b"x" * 2**20] * 3),
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    for options, message in (('["steps"]', "must be a JSON object"), ('{"seed": -1}', "seed: -1 is outside"),
                             ('{"max_seconds": 1e400}', "max_seconds: inf is not a finite number"),
                             ('{"use_apg": 1}', "use_apg: 1 must be true or false"),
                             ('{"out": "/tmp/x.mp4"}', "out cannot be set")):
        answer = client.post("/jobs", files=_files(short_wav), data={"options": options})
        assert answer.status_code == 422 and message in answer.json()["error"], (options, answer.text)
    assert client.get("/jobs").json() == {"jobs": [], "next_cursor": None} and list(store.jobs_dir.iterdir()) == []
    for _ in range(3):
        assert client.post("/jobs", files=_files(short_wav)).status_code == 201
    full = client.post("/jobs", files=_files(short_wav))
    assert full.status_code == 429 and "the queue is full (3 jobs waiting or running" in full.json()["error"]
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="cannot open the job database there"):
        JobStore(tmp_path / "file" / "data")
    assert client.get("/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/jobs/short").json() == {"error": "no job 'short'"}


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INFINITE_TALK_TOKEN", raising=False)
    for argv, message in ((["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a token"),
                          (["--host", "example.org"], "refusing to listen on example.org without a token"),
                          (["--token", "short"], "--token is 5 characters; use at least 16")):
        code = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--preset", "tiny", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    first = JobStore(tmp_path / "d")
    first.acquire_runner_lock()
    with pytest.raises(OptionError, match="another infinite-talk server is running on the data folder"):
        JobStore(tmp_path / "d").acquire_runner_lock()


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    store = JobStore(tmp_path_factory.mktemp("fuzz"), Limits(max_upload_bytes=2**20, max_queued=5))
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(store, TOKEN))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzzing_finds_no_server_error(case):
    case.headers = {**(case.headers or {}), **AUTH}  # past the token check (its refusals: test_service.py)
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert response.json()["error"]


class StubPipeline:
    """Stands in for the models: fails the way it is told, or 'finishes' writing nothing."""

    load_plan = SimpleNamespace(lines=["device: cpu"])  # a LoadedPlan's lines
    peers = None

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.requests = []

    def generate(self, request, progress, should_stop, on_checkpoint, resume):
        self.requests.append(request)
        progress({"chunk": 1, "chunks": 1, "step": 1, "steps": 1, "passes": 1, "elapsed_s": 0.5, "eta_s": 1.25})
        outcome = self.outcomes.pop(0)
        raise outcome


def test_a_failing_job_is_recorded_and_the_worker_takes_the_next(store, short_wav):
    import threading
    import time

    from infinite_talk.errors import InputError
    from infinite_talk.service.worker import Worker

    bad = store.submit(EXAMPLES / "portrait.png", short_wav, options={"steps": 1})
    crash = store.submit(EXAMPLES / "portrait.png", short_wav, options={"steps": 1})
    pipe = StubPipeline([InputError("the speech is too quiet; record it louder"), ZeroDivisionError("boom")])
    stop = threading.Event()
    worker = Worker(store, pipe, "worker-test", stop)
    worker.start()
    deadline = time.monotonic() + 30
    while store.get(crash.id).state != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    store.wake()
    worker.join(5)
    first, second = store.get(bad.id), store.get(crash.id)
    assert (first.state, first.error) == ("failed", "the speech is too quiet; record it louder")
    assert (second.state, second.error) == ("failed", "internal error: ZeroDivisionError: boom")
    assert first.progress["eta_s"] == 1.25 and first.plan["load"]["worker"] == "worker-test"
    assert [Path(r.image).name for r in pipe.requests] == ["reference.png", "reference.png"]
    assert not worker.is_alive()


def test_video_reference_is_taken_by_content(store, short_wav, tmp_path):
    renamed = tmp_path / "clip.png"  # a video named like a picture: decided by what is in it
    renamed.write_bytes((EXAMPLES / "reference_video.mp4").read_bytes())
    job = store.submit(renamed, short_wav)
    ref = job.inputs["reference"]
    assert ref["kind"] == "video" and ref["name"] == "clip.png" and ref["frames"] > 1 and ref["fps"] > 0
    assert job.plan["reference"] == "video" and job.plan["color_correction"] == 0.0


def test_one_worker_per_gpu():
    from infinite_talk.service.app import worker_devices

    assert worker_devices("auto", 1) == ["auto"] and worker_devices("cpu", 2) == ["cpu", "cpu"]
    with pytest.raises(OptionError, match="--workers 2 with --device cuda:1: each worker needs its own GPU"):
        worker_devices("cuda:1", 2)
    with pytest.raises(OptionError, match="--workers must be at least 1"):
        worker_devices("auto", 0)
