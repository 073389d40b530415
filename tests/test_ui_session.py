"""The UI server's state: generations are jobs of the job service's store, run by its worker (queue positions,
cancel keeping the finished chunks, resume after a restart with a data folder); model loading waits for the GPU;
what a (reloaded) page shows comes from the server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from infinite_talk.errors import CheckpointError, NotLoadedError
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.service import live as live_module
from infinite_talk.testing.machines import simulated
from infinite_talk.ui import controls as C
from infinite_talk.ui import jobs as J
from infinite_talk.ui.session import BusyError, Studio, audio_frames

EXAMPLES = Path(__file__).parent / "data" / "examples"


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


TINY = LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32")


def _request(audio, **extra) -> GenerateOptions:
    return GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(audio), **{**SHORT, "steps": 2, **extra})


def _until(studio: Studio, job_id: str, states=("completed", "failed", "cancelled"), timeout: float = 300):
    deadline = time.monotonic() + timeout
    while (job := studio.store.get(job_id)).state not in states:
        assert time.monotonic() < deadline, f"job still {job.state}"
        time.sleep(0.05)
    return job


def test_studio_refuses_to_run_before_models_load(studio, one_chunk):
    with pytest.raises(NotLoadedError, match="press 'Load models'"):
        studio.require_models()
    with pytest.raises(NotLoadedError):
        studio.submit(_request(one_chunk))
    assert "known once models are loaded" in studio.memory_text()
    assert J.load_texts(studio) == ("No models loaded yet.", "")
    assert studio.cancel(None).startswith("Nothing to cancel")
    assert studio.temporary and studio.runs_jobs and studio.store.list() == []


def test_refused_load_option_fails_before_the_models_are_touched(studio):
    with pytest.raises(Exception, match="attention=flash_attn_3: needs a Hopper GPU"):
        studio.start_load(LoadOptions(preset="tiny", attention="flash_attn_3"))
    assert studio.loading.state == "idle"


def test_loading_waits_for_the_gpu_and_every_page_sees_the_models(studio):
    with studio.worker.gpu:  # a job holds the GPU: the load waits its turn
        studio.start_load(TINY)
        assert studio.loading.state == "waiting"
        assert J.load_texts(studio)[0].startswith("**Waiting for the GPU:**")
        with pytest.raises(BusyError, match="being loaded already"):
            studio.start_load(TINY)
        assert not studio.loaded
    deadline = time.monotonic() + 300
    while studio.loading.state in ("waiting", "loading"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert studio.loading.state == "loaded" and studio.loaded and "MiB on cpu" in studio.memory_text()
    text, plan = J.load_texts(studio)  # what a reloaded page or a second tab shows
    assert text == "**Models loaded** (tiny geometry on cpu)." and "geometry: tiny" in plan


def test_jobs_queue_with_positions_and_a_waiting_job_cancels_at_once(studio, one_chunk):
    assert studio.loaded  # the test above
    with studio.worker.gpu:  # the worker cannot take a job: all three wait, in submission order
        first, second, third = (studio.submit(_request(one_chunk, seed=s)) for s in (1, 2, 3))
        assert J.job_panel(studio, first.id).status == "Starting…"
        assert J.job_panel(studio, second.id).status.startswith(
            "**Waiting for the GPU:** position 2 in the queue (1 job ahead; one runs at a time).")
        assert "position 3 in the queue (2 jobs ahead" in J.job_panel(studio, third.id).status
        assert studio.active_job().id == first.id  # what a page opened now shows
        assert studio.cancel(second.id) == "Cancelled: the job left the queue; nothing was generated."
        assert "position 2 in the queue" in J.job_panel(studio, third.id).status
    ends = [_until(studio, job.id) for job in (first, third)]
    assert [j.state for j in ends] == ["completed", "completed"] and ends[0].started_at <= ends[1].started_at
    assert studio.store.get(second.id).state == "cancelled" and studio.store.get(second.id).runs == 0
    panel = J.job_panel(studio, first.id)
    assert panel.status.startswith("**Done:** 20 frames, 0.80 s, seed 1, ") and not panel.active
    assert probe_media(panel.video).frames == 20 and Path(panel.video).parent.parent == studio.output_dir
    assert json.loads(Path(panel.sidecar).read_text())["seed"] == 1
    assert [label for _, label in panel.previews] == ["chunk 1/1"]
    assert json.loads(panel.live)["ended"] is True and len(json.loads(panel.live)["segments"]) == 1
    assert studio.calibration["s_per_call"] > 0  # a finished run calibrates the time estimate
    assert "cancelled · portrait.png" in J.history_text(studio)
    assert studio.cancel(first.id) == "Nothing to cancel: the generation has already finished."


def test_cancel_stops_at_the_next_step_and_keeps_the_finished_chunk(studio, two_chunks, monkeypatch):
    job_id = {}
    original = live_module.LiveWriter.on_chunk

    def on_chunk(self, k, frames, frames_before):  # as the Cancel button does, after the first chunk
        original(self, k, frames, frames_before)
        job_id["message"] = studio.cancel(job_id["id"])

    monkeypatch.setattr(live_module.LiveWriter, "on_chunk", on_chunk)
    request = _request(two_chunks, steps=3, seed=5)
    assert audio_frames(request) == 30
    with studio.worker.gpu:
        job_id["id"] = studio.submit(request).id
    job = _until(studio, job_id["id"])
    assert job_id["message"] == "Cancelling: the run stops before the next step; finished chunks are kept."
    assert job.state == "cancelled" and "cancelled at chunk 2/2, step 1/3" in job.error
    panel = J.job_panel(studio, job.id)
    assert panel.status.startswith("**Cancelled.** cancelled at chunk 2/2")
    assert f"the 21 finished frames are kept in {panel.video}" in panel.status
    assert probe_media(panel.video).frames == 21
    assert json.loads(Path(panel.sidecar).read_text())["output"]["chunks_done"] == 1


def test_a_job_resumes_after_a_restart_with_a_data_dir(cache, studio, two_chunks, tmp_path, monkeypatch):
    """`infinite-talk ui --data-dir DIR`: a UI process that dies mid-job leaves the job in DIR; the next start
    takes it back and, once models are loaded, resumes it from its last finished chunk."""
    first = Studio(output_dir=tmp_path / "outputs", data_dir=tmp_path / "data", caps=studio.caps)
    first.load(TINY, say=lambda m: None)

    class Died(BaseException):  # the process dies after chunk 1 (nothing of the worker runs after this)
        pass

    def die(self, k, frames, frames_before):
        raise Died()

    monkeypatch.setattr(live_module.LiveWriter, "on_chunk", die)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying worker thread's report
    job = first.submit(_request(two_chunks, seed=9))
    first.worker.join(300)
    assert not first.worker.is_alive() and first.store.get(job.id).state == "running"
    first.close()
    monkeypatch.undo()

    restarted = Studio(output_dir=tmp_path / "outputs", data_dir=tmp_path / "data", caps=studio.caps)
    assert restarted.recovered["requeued"] == [job.id] and restarted.runs_jobs and not restarted.temporary
    assert J.job_panel(restarted, job.id).status.startswith("**Waiting for models:**")
    restarted.load(TINY, say=lambda m: None)
    done = _until(restarted, job.id)
    assert (done.state, done.runs, done.resumed_from_chunk, done.frames) == ("completed", 2, 1, 30)
    video = J.job_panel(restarted, job.id).video
    assert probe_media(video).frames == 30
    restarted.close()
    assert (tmp_path / "data" / "jobs" / job.id).is_dir()  # a given data folder is kept


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
