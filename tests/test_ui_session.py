"""The UI server's state: one GPU job at a time with queue positions, cancel, failures that leave the server
working, and the run path on the tiny preset (cancel keeps the finished chunks)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import soundfile as sf

from infinite_talk.errors import CheckpointError, InfiniteTalkError, NotLoadedError
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.plan.probe import simulated
from infinite_talk.ui import controls as C
from infinite_talk.ui.session import BusyError, GpuQueue, Job, Studio, audio_frames

EXAMPLES = Path(__file__).parent / "data" / "examples"


def _events(job: Job, until: str | None = None) -> list[tuple[str, object]]:
    out = []
    for kind, payload in job.iter_events(poll_s=0.05):
        if kind == "tick":
            continue
        out.append((kind, payload))
        if kind == until:
            break
    return out


def test_jobs_take_turns_and_report_their_position():
    gpu = GpuQueue()
    release = threading.Event()
    ran = []

    def slow(job):
        ran.append("first")
        release.wait(10)
        return "first done"

    first = Job(slow).start(gpu)
    second = Job(lambda job: ran.append("second") or "second done").start(gpu)
    third = Job(lambda job: ran.append("third") or "third done").start(gpu)
    assert _events(first, until="started")[-1] == ("started", None)
    assert ("waiting", 1) in _events(second, until="waiting")
    assert ("waiting", 2) in _events(third, until="waiting")
    release.set()
    assert _events(first)[-2:] == [("done", "first done"), ("end", None)]
    assert ("done", "second done") in _events(second)
    assert ("done", "third done") in _events(third)
    assert ran == ["first", "second", "third"] and len(gpu) == 0


def test_cancel_while_waiting_leaves_the_queue_and_a_failure_does_not_block_it():
    gpu = GpuQueue()
    release = threading.Event()

    def boom(job):
        release.wait(10)
        raise RuntimeError("kernel exploded")

    failing = Job(boom).start(gpu)
    waiting = Job(lambda job: pytest.fail("a cancelled job must not run")).start(gpu)
    later = Job(lambda job: "still serving").start(gpu)
    assert ("waiting", 1) in _events(waiting, until="waiting")
    waiting.cancel_requested.set()
    kinds = _events(waiting)
    assert kinds[-2][0] == "cancelled" and "while waiting for the GPU" in kinds[-2][1]
    release.set()
    failed = dict(_events(failing))["failed"]
    assert isinstance(failed, RuntimeError)
    assert C.failure_text(failed).startswith("Internal error: kernel exploded.")
    assert ("done", "still serving") in _events(later)


@pytest.fixture(scope="module")
def studio(cache, tmp_path_factory):
    return Studio(preset="tiny", output_dir=tmp_path_factory.mktemp("outputs"))


def _clip(folder, seconds: float):
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    path = folder / f"{seconds}s.wav"
    sf.write(path, data[: int(seconds * rate)], rate)
    return path


SHORT = dict(frame_num=21, motion_frames=5)  # 21-frame chunks (16 new frames each): quick on a CPU


@pytest.fixture(scope="module")
def two_chunks(tmp_path_factory):
    return _clip(tmp_path_factory.mktemp("audio"), 1.2)  # 30 frames: 2 chunks of 21


@pytest.fixture(scope="module")
def one_chunk(tmp_path_factory):
    return _clip(tmp_path_factory.mktemp("audio"), 0.8)  # 20 frames: 1 chunk of 21


def test_studio_refuses_to_run_before_models_load_and_one_job_per_page(studio):
    with pytest.raises(NotLoadedError, match="press 'Load models'"):
        studio.require_models()
    assert "known once models are loaded" in studio.memory_text()
    release = threading.Event()
    job = studio.submit("page-1", lambda job: release.wait(10))
    with pytest.raises(BusyError, match="already has a job"):
        studio.submit("page-1", lambda job: None)
    assert studio.cancel("page-2").startswith("Nothing to cancel")
    release.set()
    _events(job)


def test_refused_load_option_fails_before_the_models_are_touched(studio):
    with pytest.raises(Exception, match="attention=flash_attn_3: needs a Hopper GPU"):
        studio.load(LoadOptions(preset="tiny", attention="flash_attn_3"), say=lambda m: None)


def test_cancel_stops_at_the_next_step_and_keeps_the_finished_chunk(studio, two_chunks):
    studio.load(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"), say=lambda m: None)
    assert studio.loaded and "MiB on cpu" in studio.memory_text()
    out = studio.new_output_path()
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(two_chunks), steps=3, seed=5,
                              out=str(out), **SHORT)
    assert audio_frames(request) == 30
    chunks = []

    def work(job):
        def on_chunk(k, frames):
            chunks.append((k, frames.shape))
            studio.cancel("page-cancel")  # as the Cancel button does, after the first chunk
        return studio.run_generation(request, progress=lambda info: job.emit("progress", info), on_chunk=on_chunk,
                                     should_stop=job.should_stop)

    job = studio.submit("page-cancel", work)
    events = _events(job)
    cancelled = [p for k, p in events if k == "cancelled"]
    assert cancelled and "cancelled at chunk 2/2, step 1/3" in cancelled[0]
    steps_seen = [(p["chunk"], p["step"]) for k, p in events if k == "progress"]
    assert steps_seen == [(1, 1), (1, 2), (1, 3)]
    assert [k for k, _ in chunks] == [0] and chunks[0][1][0] == 21
    assert probe_media(out).frames == 21
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "cancelled" and sidecar["output"]["chunks_done"] == 1
    assert studio.calibration is None  # a cancelled run does not calibrate the estimate


def test_a_full_run_calibrates_the_time_estimate(studio, one_chunk):
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(one_chunk), steps=2,
                              out=str(studio.new_output_path()), **SHORT)
    result = studio.run_generation(request)
    assert result.frames == 20 and result.seed == result.sidecar["seed"]
    cal = studio.calibration
    assert cal["size"] == 480 and cal["s_per_call"] > 0 and cal["s_per_chunk"] > 0
    plan = studio.pipeline.plan_request(request, audio_frames(request))
    expected = plan["model_calls"] * cal["s_per_call"] + 1 * cal["s_per_chunk"]
    assert C.time_estimate(plan, cal).startswith(f"≈ {expected:.0f} s")


def test_choice_status_with_the_real_probe_never_offers_a_refused_value_as_available(studio):
    for name, rows in studio.statuses(LoadOptions(preset="tiny")).items():
        for s in rows:
            trial = LoadOptions(preset="tiny", **{name: s.value})
            if s.available:
                C.preflight(trial, studio.caps)
            else:
                with pytest.raises(Exception, match=f"{name}"):
                    C.preflight(trial, studio.caps)


def test_simulated_machine_refusals_match_the_planner():
    caps = simulated("a100")
    rows = C.choice_status(LoadOptions(), caps)["attention"]
    assert {s.value for s in rows if not s.available} >= {"flash_attn_3", "sageattn_3"}


def test_models_folder_files_are_offered_per_component_and_a_wrong_file_is_a_message(studio, tmp_path):
    from infinite_talk.presets.tiny import ensure_tiny_models

    files = ensure_tiny_models()  # real file formats, tiny shapes
    root = Path(files.vae).parents[1]
    folder = Studio(models_dir=str(root), output_dir=tmp_path, caps=studio.caps)
    offered = {name: [v for _, v in pairs] for name, pairs in C.component_choices(folder.found, str(root)).items()}
    assert offered["transformer"] == [C.AUTO, files.transformer[0]]  # the shard folder, as one entry
    for name in ("adapter", "vae", "t5", "t5_tokenizer", "clip", "wav2vec"):
        assert offered[name] == [C.AUTO, getattr(files, name)], name
    options = C.load_options_from_form(C.SOURCE_FOLDER, {"vae": files.vae, "model_precision": "fp32"}, str(root))
    assert (options.models_dir, options.vae, options.preset) == (str(root), files.vae, None)
    with pytest.raises(CheckpointError, match="head.modulation has shape .* expected"):  # tiny files, 14B folder
        folder.load(options, say=lambda m: None)
    assert not folder.loaded


def test_with_a_data_dir_runs_go_through_the_job_service_queue(studio, tmp_path, one_chunk):
    """`infinite-talk ui --data-dir DIR`: the page's run is a job in the service's SQLite queue, worked by the
    service's worker (here in-process), and its mp4 + sidecar come back to the page's output folder."""
    from infinite_talk.pipeline import InfiniteTalkPipeline
    from infinite_talk.service.worker import Worker

    queued = Studio(output_dir=tmp_path / "outputs", data_dir=tmp_path / "data", caps=studio.caps)
    queued.require_models()  # no local models needed: the service holds them
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(one_chunk), steps=2, text_scale=1,
                              audio_scale=1, seed=7, max_seconds=0.6, out=str(tmp_path / "outputs" / "q.mp4"), **SHORT)
    with pytest.raises(InfiniteTalkError, match="no `infinite-talk serve --data-dir .*` is running"):
        queued.run_generation(request)  # nobody works the queue: refused, not a page waiting forever
    assert queued.store.list() == []
    queued.store.acquire_runner_lock()  # what `serve` does; its worker runs in this process here
    service_models = InfiniteTalkPipeline()
    service_models.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    stop = threading.Event()
    worker = Worker(queued.store, service_models, "worker-ui", stop)
    worker.start()
    seen = []
    try:
        result = queued.run_generation(request, progress=seen.append)
    finally:
        stop.set()
        worker.join(20)
    assert probe_media(result.video_path).frames == 15 and result.frames == 15 and result.seed == 7
    assert result.sidecar["status"] == "completed" and result.sidecar["effective"]["steps"] == 2
    assert result.sidecar_path.is_file()
    (job,) = queued.store.list()
    assert job.state == "completed" and job.frames == 15
