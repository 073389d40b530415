"""The web UI's pure parts: schema → controls, availability and refusals of load choices, form → options, and the
texts the page shows (no gradio, no browser)."""

from __future__ import annotations

import dataclasses

import pytest

from infinite_talk.errors import InputError, NotLoadedError, OptionError
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.request_plan import plan_request
from infinite_talk.testing.machines import simulated
from infinite_talk.ui import app
from infinite_talk.ui import controls as C

CPU = simulated("cpu")
H100 = simulated("h100")


# ---- schema → controls -------------------------------------------------------------------------------------------
def test_every_schema_field_has_a_control():
    shown = set(app.MEDIA_FIELDS).union(*app.GENERATE_LAYOUT.values(), app.unplaced_generate_fields())
    assert {f.name for f in dataclasses.fields(GenerateOptions)} - shown == {"out"}
    load = C.LOAD_SPECIAL | set(C.component_fields()) | set(C.load_choice_fields()) | set(C.other_load_fields())
    assert load == {f.name for f in dataclasses.fields(LoadOptions)}
    assert {"quantization", "attention", "model_precision", "vae_precision"} <= set(C.load_choice_fields())


def test_controls_carry_the_schema_help_choices_and_ranges():
    meta = {f.name: f.metadata for f in dataclasses.fields(GenerateOptions)}
    steps = C.field_spec(GenerateOptions, "steps")
    assert (steps.kind, steps.minimum, steps.maximum, steps.integer, steps.default) == ("number", 1, 1000, True, 40)
    assert steps.info == f"{meta['steps']['help']} (1 to 1000)"
    text = C.field_spec(GenerateOptions, "text_scale")
    assert (text.kind, text.minimum, text.maximum, text.step, text.integer) == ("slider", 0.0, 50.0, 0.1, False)
    sched = C.field_spec(GenerateOptions, "scheduler")
    assert sched.kind == "dropdown" and [v for _, v in sched.choices] == list(meta["scheduler"]["choices"])
    size = C.field_spec(GenerateOptions, "size")
    assert size.kind == "radio" and [v for _, v in size.choices] == [480, 720]
    assert C.field_spec(GenerateOptions, "use_apg").kind == "checkbox"
    seed = C.field_spec(GenerateOptions, "seed")
    assert seed.kind == "optional_number" and "random" in seed.info and C.widget_default(seed) == ""
    assert C.field_spec(GenerateOptions, "max_seconds").kind == "optional_number"
    assert C.field_spec(GenerateOptions, "bbox").kind == "lines"
    quant = C.field_spec(LoadOptions, "quantization")
    assert [v for _, v in quant.choices] == list(LoadOptions.__dataclass_fields__["quantization"].metadata["choices"])


# ---- load choices: availability and refusals ----------------------------------------------------------------------
def _status(statuses, name, value):
    return next(s for s in statuses[name] if s.value == value)


def test_unavailable_choices_stay_listed_with_the_planner_reason():
    statuses = C.choice_status(LoadOptions(preset="tiny"), CPU)
    fa3 = _status(statuses, "attention", "flash_attn_3")
    assert not fa3.available and "needs a Hopper GPU (sm_90)" in fa3.reason
    assert fa3.label.startswith("flash_attn_3 — unavailable: needs a Hopper GPU")
    auto = _status(statuses, "attention", "auto")
    assert auto.available and auto.effective == "sdpa-native" and auto.label == "auto → sdpa-native"
    assert [s.value for s in statuses["attention"]] == list(
        LoadOptions.__dataclass_fields__["attention"].metadata["choices"])
    on_h100 = C.choice_status(LoadOptions(), H100)
    assert _status(on_h100, "attention", "flash_attn_3").available
    fp4 = _status(on_h100, "quantization", "fp4")
    assert not fp4.available and "Blackwell" in fp4.reason


def test_one_refused_choice_does_not_mark_the_other_options_refused():
    statuses = C.choice_status(LoadOptions(attention="flash_attn_3"), CPU)
    assert _status(statuses, "quantization", "disabled").available
    assert _status(statuses, "model_precision", "fp32").available
    assert not _status(statuses, "attention", "flash_attn_3").available


def test_load_check_shows_the_plan_or_the_refusal():
    ok = C.load_check_text(LoadOptions(preset="tiny"), CPU)
    assert "attention: auto → sdpa-native (" in ok and "device: auto → cpu" in ok
    refused = C.load_check_text(LoadOptions(preset="tiny", attention="flash_attn_3"), CPU)
    assert refused.startswith("**Refused:**\n\n- attention=flash_attn_3: needs a Hopper GPU")
    assert "never swapped" in refused
    table = C.availability_table(C.choice_status(LoadOptions(), CPU))
    assert "| attention | flash_attn_3 | ✗ unavailable: needs a Hopper GPU" in table


def test_model_panel_to_load_options():
    values = {"attention": "sdpa", "model_precision": "fp32", "device": "cpu", "transformer": C.AUTO}
    opts = C.load_options_from_form(C.SOURCE_TINY, values, None)
    assert (opts.preset, opts.attention, opts.model_precision, opts.device) == ("tiny", "sdpa", "fp32", "cpu")
    with pytest.raises(OptionError, match="tiny preset builds its own files"):
        C.load_options_from_form(C.SOURCE_TINY, {"vae": "/models/vae.pth"}, None)
    with pytest.raises(OptionError, match="--models-dir"):
        C.load_options_from_form(C.SOURCE_FOLDER, {}, None)
    folder = C.load_options_from_form(C.SOURCE_FOLDER, {"vae": "/m/vae.pth", "clip": C.AUTO}, "/m")
    assert (folder.models_dir, folder.vae, folder.clip, folder.preset) == ("/m", "/m/vae.pth", None, None)
    with pytest.raises(OptionError, match="attention: unknown value 'fast'"):
        C.load_options_from_form(C.SOURCE_HUB, {"attention": "fast"}, None)


def test_component_choices_list_found_files_and_group_dit_shards(tmp_path):
    shards = tmp_path / "Wan2.1-I2V-14B-480P"
    shards.mkdir()
    files = [shards / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for f in files:
        f.write_bytes(b"x")
    vae = tmp_path / "Wan2.1_VAE.pth"
    found = {"dit": files, "vae": [vae]}
    pairs = C.component_choices(found, str(tmp_path))
    assert pairs["transformer"][1:] == [("Wan2.1-I2V-14B-480P", str(shards))]
    assert pairs["vae"][1:] == [("Wan2.1_VAE.pth", str(vae))]
    assert all(p[0][1] == C.AUTO for p in pairs.values())


# ---- generation panel → GenerateOptions ---------------------------------------------------------------------------
def test_form_values_become_validated_options():
    form = {"image": "/in/face.png", "video": "/in/clip.mp4", "audio": "/in/a.wav", "seed": "", "shift": "",
            "max_seconds": "2.5", "steps": 4.0, "text_scale": 1.5, "bbox": "", "color_correction": ""}
    req = C.request_from_form(C.TASK_IMAGE, form, out="/o/talk.mp4")
    assert (req.image, req.video, req.seed, req.shift, req.max_seconds, req.steps) == (
        "/in/face.png", None, None, None, 2.5, 4)
    assert isinstance(req.steps, int) and req.text_scale == 1.5 and req.bbox is None and req.out == "/o/talk.mp4"
    dub = C.request_from_form(C.TASK_VIDEO, form)
    assert (dub.image, dub.video) == (None, "/in/clip.mp4")
    assert C.request_from_form(C.TASK_IMAGE, {"seed": "12"}).seed == 12
    with pytest.raises(OptionError, match="seed: '1.5' must be a whole number"):
        C.request_from_form(C.TASK_IMAGE, {"seed": "1.5"})
    with pytest.raises(OptionError, match=r"steps: 0 is outside \[1, 1000\]"):
        C.request_from_form(C.TASK_IMAGE, {"steps": 0})
    with pytest.raises(OptionError, match="shift: 'abc' is not a number"):
        C.request_from_form(C.TASK_IMAGE, {"shift": "abc"})


def test_speaker_boxes_parse_or_say_what_is_wrong():
    def boxes(text):
        return C.request_from_form(C.TASK_IMAGE, {"bbox": text}).bbox

    assert boxes("0, 0, 100, 200; 0,200,100,400") == [[0, 0, 100, 200], [0, 200, 100, 400]]
    assert boxes("[1 2 3 4]\n[5 6 7 8]") == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert boxes("  ") is None
    with pytest.raises(OptionError, match="bbox: box 2 .* must be 4 whole numbers"):
        boxes("0,0,10,10; 1,2,3")


def test_missing_inputs_are_named_as_on_the_page():
    with pytest.raises(InputError, match="upload one under 'Reference image'"):
        C.check_inputs(GenerateOptions(audio="/a.wav"), C.TASK_IMAGE)
    with pytest.raises(InputError, match="'Reference video'"):
        C.check_inputs(GenerateOptions(image="/i.png", audio="/a.wav"), C.TASK_VIDEO)
    with pytest.raises(InputError, match="'Speaker 1 audio'"):
        C.check_inputs(GenerateOptions(image="/i.png"), C.TASK_IMAGE)


# ---- texts -------------------------------------------------------------------------------------------------------
def test_plan_box_counts_steps_passes_chunks_and_calls():
    plan = plan_request(GenerateOptions(steps=4, text_scale=1.0, audio_scale=1.0), audio_frames=200).as_dict()
    text = C.plan_box_text(plan)
    assert "steps that run: 4" in text and "passes per step: 1 (cond;" in text
    assert "chunks: 3 → 200 frames, 8.00 s" in text and "model calls: 12 (3 chunks × 4 steps × 1 passes)" in text
    no_audio = C.plan_box_text(plan_request(GenerateOptions(steps=7)).as_dict())
    assert "known once speaker 1's audio is uploaded; model calls per chunk: 21" in no_audio


def test_time_estimate_comes_from_the_last_run_at_the_same_size():
    plan = plan_request(GenerateOptions(steps=4), audio_frames=200).as_dict()  # 3 chunks, 36 calls
    assert "first run" in C.time_estimate(plan, None)
    assert "first run" in C.time_estimate(plan, {"size": 720, "s_per_call": 1.0, "s_per_chunk": 1.0})
    text = C.time_estimate(plan, {"size": 480, "s_per_call": 2.0, "s_per_chunk": 3.0})
    assert text.startswith("≈ 81 s")  # 36 calls × 2 s + 3 chunks × 3 s


def test_failures_become_one_message_without_a_traceback():
    assert C.failure_text(NotLoadedError("Transformer is not loaded")) == "Transformer is not loaded"
    oom = C.failure_text(MemoryError("cannot allocate 40 GiB"), GenerateOptions(size=720),
                         LoadOptions(model_precision="fp32"), C.choice_status(LoadOptions(), CPU))
    assert oom.startswith("Out of memory (cannot allocate 40 GiB)")
    assert "resolution 480" in oom and "model precision fp16 or bf16 (half of fp32" in oom and "Finished chunks are kept" in oom
    cuda_like = C.failure_text(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert cuda_like.startswith("Out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    other = C.failure_text(KeyError("boom"))
    assert other.startswith("Internal error: 'boom'.") and "server keeps running" in other
    assert "Traceback" not in other


def test_cli_has_the_ui_command_with_the_schema_help():
    from infinite_talk.cli import build_parser

    parser = build_parser()
    ns = parser.parse_args(["ui", "--preset", "tiny", "--models-dir", "/m", "--host", "0.0.0.0", "--port", "7999"])
    assert ns.func is app.cmd_ui
    assert (ns.preset, ns.models_dir, ns.host, ns.port, ns.output_dir) == ("tiny", "/m", "0.0.0.0", 7999, "outputs")
    ui_help = next(a for a in parser._subparsers._group_actions[0].choices["ui"]._actions if a.dest == "preset").help
    assert ui_help == LoadOptions.__dataclass_fields__["preset"].metadata["help"]


def test_a_mode_preset_fills_the_fields_visibly():
    assert C.mode_preset({"mode": "standard"}, CPU) == ({}, {})
    pytest.importorskip("infinite_talk.presets.fast")
    load, generate = C.mode_preset({"mode": "fast", "lora": ["/l.safetensors"], "quantization": "int8"}, CPU)
    assert load == {"quantization": "disabled"}  # fp8 would only store weights on a CPU: the preset says so
    assert (generate["scheduler"], generate["steps"], generate["text_scale"], generate["audio_scale"]) == (
        "distill4", 4, 1.0, 1.0)


# ---- UI security: a login beyond loopback ----------------------------------------------------------------------------
def test_auth_is_required_beyond_loopback():
    for host in ("127.0.0.1", "localhost", "::1"):
        app.check_exposure(host, None)
    with pytest.raises(OptionError, match="refusing to serve the UI on 0.0.0.0 without a login: pass --auth"):
        app.check_exposure("0.0.0.0", None)
    app.check_exposure("0.0.0.0", ("me", "long enough"))
    assert app.parse_auth("me:a:b:c:long") == ("me", "a:b:c:long") and app.parse_auth(None) is None
    for bad in ("nocolon", ":password1", "me:", "me:short"):
        with pytest.raises(OptionError, match="--auth"):
            app.parse_auth(bad)


def test_ui_command_refuses_to_serve_beyond_loopback_without_a_login(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != app.AUTH_ENV}
    done = subprocess.run([sys.executable, "-m", "infinite_talk.cli", "ui", "--preset", "tiny", "--host", "0.0.0.0",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: refusing to serve the UI on 0.0.0.0 without a login: pass --auth USER:PASSWORD (or set "
        f"{app.AUTH_ENV}) or serve on 127.0.0.1"]
    assert not (tmp_path / "out").exists()  # refused before anything was set up


def test_a_launched_ui_asks_scripts_for_the_login(tmp_path):
    import socket
    import urllib.error
    import urllib.request

    from gradio_client import Client

    from infinite_talk.ui.session import Studio

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.launch(Studio(preset="tiny", output_dir=tmp_path, caps=CPU), port=port, block=False,
                      auth=("me", "long enough"))
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30)
        assert refused.value.code == 401
        client = Client(f"http://127.0.0.1:{port}/", auth=("me", "long enough"), verbose=False)
        assert "/generate" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        demo.close()


# ---- #20: refusals together, page wording, boxes, speech minimum, recent runs ---------------------------------------
def test_every_refusal_is_listed_on_its_own_line():
    text = C.load_check_text(LoadOptions(preset="tiny", compile=True, ulysses=2), CPU)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 2 and lines[0].startswith("- compile=on: ") and lines[1].startswith("- ulysses=2: ")
    table = C.availability_table(C.choice_status(LoadOptions(preset="tiny"), CPU))
    assert "| compile | on | ✗ unavailable: needs a CUDA GPU" in table


def test_messages_use_the_users_file_name_and_the_pages_fields(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    raw = f"{tmp_path}/gradio/0a1b2c/my face.png: not a readable image (UnidentifiedImageError: cannot identify)"
    assert C.page_text(raw) == "my face.png: not a readable image (cannot identify)"
    assert C.page_text("pass --lora FILE or set --steps 4") == "pass a file under 'LoRA files' or set Steps 4"
    with pytest.raises(OptionError) as err:
        C.request_from_form(C.TASK_IMAGE, {"steps": 5000})
    assert C.failure_text(err.value) == "Steps: 5000 is outside [1, 1000]"
    assert C.failure_text(ValueError("boom")).startswith("Internal error: boom.")


def test_speaker_boxes_accept_the_documented_and_the_json_form():
    documented = C.request_from_form(C.TASK_IMAGE, {"bbox": "0 0 10 20; 5 6 7 8"}).bbox
    assert documented == C.request_from_form(C.TASK_IMAGE, {"bbox": "[[0, 0, 10, 20], [5, 6, 7, 8]]"}).bbox == [
        [0, 0, 10, 20], [5, 6, 7, 8]]
    assert "row_min col_min row_max col_max" in C.field_spec(GenerateOptions, "bbox").info
    with pytest.raises(OptionError, match="box 1"):
        C.request_from_form(C.TASK_IMAGE, {"bbox": "1 2 3"})


def test_resolution_is_documented_and_accepted_as_text():
    size = C.field_spec(GenerateOptions, "size")
    assert C.widget_choices(size) == [("480", "480"), ("720", "720")] and C.widget_default(size) == "480"
    assert C.request_from_form(C.TASK_IMAGE, {"size": "720"}).size == 720


def test_too_short_speech_is_refused_with_the_minimum(tmp_path):
    import numpy as np
    import soundfile as sf

    from infinite_talk.media.request_check import check_audio

    sf.write(tmp_path / "short.wav", np.zeros(1600, dtype="float32"), 16000)
    with pytest.raises(InputError, match=r"short.wav is 0.10 s long; speech must be at least 0.5 s"):
        C.speech_check_text(check_audio(tmp_path / "short.wav"), "Speaker 1 audio")
    sf.write(tmp_path / "ok.wav", np.zeros((16000, 2), dtype="float32"), 16000)
    assert C.speech_check_text(check_audio(tmp_path / "ok.wav"), "x") == "✓ ok.wav: 1.00 s, stereo, 16000 Hz"
