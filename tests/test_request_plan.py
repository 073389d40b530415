"""One request plan and one typed load plan: the pipeline, the job service and the UI plan the same chunks for the
same audio, and the loaded report's typed fields are what ran (and what the sidecar records)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from infinite_talk.loading import LoadedModels, LoadedPlan, load_models, resolve_model_files
from infinite_talk.models.placement import Offload
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import probe
from infinite_talk.request_plan import frames_for_samples, plan_request, track_samples
from infinite_talk.service.store import JobStore
from infinite_talk.ui.session import audio_frames

EXAMPLES = Path(__file__).parent / "data" / "examples"
TINY = LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32")
QUICK = dict(steps=1, text_scale=1.0, audio_scale=1.0, frame_num=5, motion_frames=1, seed=4)


def test_track_and_frame_rules():
    assert track_samples([8000]) == 8000
    assert track_samples([8000, 4800], "para") == 8000  # the shorter track is padded
    assert track_samples([8000, 4800], "add") == 12800  # one speaker after the other
    assert frames_for_samples(8000) == 12 and frames_for_samples(639) == 0  # 25 fps rows of 16 kHz audio
    plan = plan_request(GenerateOptions(frame_num=5, motion_frames=1, max_seconds=0.2), audio_frames=12)
    assert plan.chunks.num_frames == 5 and plan.chunks.num_chunks == 1  # max_seconds caps at 5 frames
    two = plan.chunks_for([12, 12])
    assert two.num_chunks == plan.chunks.num_chunks and two.audio_lens == (12, 12)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    out = {}
    for name, source, seconds in (("a", "speech_en.wav", 0.5), ("b", "speech_en_speaker2.wav", 0.3)):
        data, rate = sf.read(EXAMPLES / source, dtype="float32")
        out[name] = folder / f"{name}.wav"
        sf.write(out[name], data[: int(seconds * rate)], rate)
    return out


@pytest.fixture(scope="module")
def pipe(cache):
    p = InfiniteTalkPipeline()
    p.load_models(TINY)
    return p


@pytest.mark.parametrize("speakers, mode", [(1, "para"), (2, "para"), (2, "add")])
def test_pipeline_service_and_ui_plan_the_same_chunks(pipe, clips, tmp_path, speakers, mode):
    audio2 = str(clips["b"]) if speakers == 2 else None
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(clips["a"]), audio2=audio2,
                              audio_mode=mode, out=str(tmp_path / "talk.mp4"), **QUICK)
    ui = plan_request(request, audio_frames(request), pipe.load_options).as_dict()
    store = JobStore(tmp_path / "data")
    paths = dataclasses.replace(request, image=None, audio=None, audio2=None, out=None)
    job = store.submit(EXAMPLES / "portrait.png", clips["a"], clips["b"] if speakers == 2 else None, options=paths)
    result = pipe.generate(request)
    ran = result.sidecar["effective"]
    for key in ("chunks", "model_calls", "steps", "passes_per_step"):
        assert ui[key] == job.plan[key] == ran[key], key
    assert ui["chunks"]["frames"] == result.frames
    assert result.sidecar["output"]["chunks"] == ui["chunks"]["chunks"]


def test_the_loaded_report_is_typed_and_is_what_ran(pipe, clips, tmp_path):
    report = pipe.load_plan
    assert isinstance(report, LoadedPlan) and report.options == TINY
    plan = report.plan
    assert plan.offload == Offload("none") and plan.t5_quantization == "disabled"
    assert report.quantization.t5 == {"mode": "disabled", "layers": 0}
    assert report.quantization.transformer["mode"] == plan.quantization == "disabled"
    assert report.offload == {"offload": "none"} and report.device == pipe.device
    assert {p.device for p in pipe.transformer.parameters()} == {pipe.device}
    assert plan.memory is report.memory and plan.memory.placement == plan.offload
    assert report.lines[: len(plan.options)] == plan.lines()
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(clips["a"]),
                              out=str(tmp_path / "talk.mp4"), **QUICK)
    sidecar = pipe.generate(request).sidecar
    # dicts only at the edge: the sidecar holds exactly the report's JSON form
    assert sidecar["load"]["effective"] == json.loads(json.dumps(report.as_dict(), default=str))
    assert sidecar["effective"]["offload"] == str(plan.offload) == "none"
    assert sidecar["effective"]["attention_backend"] == plan.attention_backend
    assert sidecar["effective"]["quantization"] == plan.options["quantization"].effective
    assert set(report.as_dict()) == {*plan.to_dict(), "lines", "loras", "files", "offload_report", "geometry",
                                     "quantization_report", "notes"}


def test_a_pipeline_given_its_components_makes_the_same_video(pipe, clips, tmp_path):
    plan = resolve(TINY, probe())
    files, geometry = resolve_model_files(TINY, lambda msg: None)
    loaded = load_models(plan, TINY, files, geometry)
    assert isinstance(loaded, LoadedModels)
    given = InfiniteTalkPipeline.from_loaded(loaded)
    assert given.load_plan is loaded.report and given.load_options == TINY and given.geometry == pipe.geometry
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(clips["a"]),
                              out=str(tmp_path / "given.mp4"), **QUICK)
    a = given.generate(request)
    b = pipe.generate(dataclasses.replace(request, out=str(tmp_path / "loaded.mp4")))
    assert a.frames == b.frames > 0
    assert a.sidecar["output"]["frames_sha256"] == b.sidecar["output"]["frames_sha256"]
    assert a.sidecar["load"]["effective"] == b.sidecar["load"]["effective"]


def test_t5_quantization_comes_from_the_plan(cache):
    options = dataclasses.replace(TINY, t5_quantization="fp8")
    plan = resolve(options, probe())
    assert plan.t5_quantization == "fp8-storage"  # resolved once, by the planner
    files, geometry = resolve_model_files(options, lambda msg: None)
    loaded = load_models(plan, options, files, geometry)
    assert loaded.report.quantization.t5["mode"] == "fp8-storage"
    kinds = {type(m.weight).__name__ for m in loaded.text_encoder.model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Float8Tensor"}
