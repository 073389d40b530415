"""The main job on the tiny preset: lengths, steps, passes, speakers, dubbing, errors and the sidecar.

Most runs use short chunks (`SHORT`: 21 frames, 5 context frames, so 16 new frames per chunk) and clips of a
second or two: the behaviour under test does not depend on the chunk length, and a 21-frame chunk is 6 latent frames
to encode and decode instead of 21. One test keeps the default 81/9 chunking end to end; runs over the whole example
recordings are marked `slow` (CI runs them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from infinite_talk.cli import main as cli_main
from infinite_talk.errors import InputError, NotLoadedError, OptionError
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline

EXAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "examples"
AAC_FRAME_S = 1024 / 16000  # decoded AAC may run up to one frame past the cut
SHORT = dict(frame_num=21, motion_frames=5)  # chunks of 21 frames: 21, then 16 new frames per chunk
SHORT_FLAGS = ["--frame-num", "21", "--motion-frames", "5"]


@pytest.fixture(scope="module")
def pipe(cache):
    p = InfiniteTalkPipeline()
    plan = p.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    assert plan.geometry.name == "tiny" and plan.as_dict()["geometry"] == "tiny"
    return p


def _cut(folder, name: str, seconds: float):
    """The first `seconds` of an example recording, as a wav file."""
    data, rate = sf.read(EXAMPLES / name, dtype="float32")
    path = folder / f"{name.removesuffix('.wav')}_{seconds}s.wav"
    sf.write(path, data[: int(seconds * rate)], rate)
    return path


@pytest.fixture(scope="module")
def wav5(tmp_path_factory):
    return _cut(tmp_path_factory.mktemp("audio"), "speech_en.wav", 5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Short cuts of the example speech: speaker 1 for 2 s and 1.2 s, speaker 2 for 0.8 s, speaker 1 for 1 s."""
    folder = tmp_path_factory.mktemp("clips")
    return {"s1_2s": _cut(folder, "speech_en.wav", 2.0), "s1_1.2s": _cut(folder, "speech_en.wav", 1.2),
            "s2_0.8s": _cut(folder, "speech_en_speaker2.wav", 0.8), "s1_1s": _cut(folder, "speech_en.wav", 1.0)}


class CallCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1

    def remove(self):
        self.handle.remove()


def _request(tmp_path, **kw):
    base = dict(image=str(EXAMPLES / "portrait.png"), audio=str(EXAMPLES / "speech_en.wav"), steps=2,
                out=str(tmp_path / "out.mp4"), seed=7)
    base.update(kw)
    return GenerateOptions(**base)


def test_five_seconds_give_125_frames_and_a_5s_aac_track(pipe, tmp_path, wav5):
    result = pipe.generate(_request(tmp_path, audio=str(wav5)))
    info = probe_media(result.video_path)
    assert info.frames == 125 and info.fps == 25 and info.video_codec == "h264"
    assert info.audio_codec == "aac"
    assert 5.0 - 1e-3 <= info.audio_duration <= 5.0 + AAC_FRAME_S + 1e-3
    assert result.sidecar["output"]["chunks"] == 2  # 125 frames = 81 + 72 - trim


def test_steps_run_exactly_and_passes_follow_the_scales(pipe, tmp_path):
    for text, audio, passes in ((5.0, 4.0, 3), (1.0, 2.0, 2), (1.0, 1.0, 1)):
        counter = CallCounter(pipe.transformer)
        try:
            result = pipe.generate(_request(tmp_path, steps=6, text_scale=text, audio_scale=audio, max_seconds=0.8,
                                            **SHORT))
        finally:
            counter.remove()
        assert counter.calls == 6 * passes  # one chunk (20 frames), 6 steps, `passes` model calls per step
        eff = result.sidecar["effective"]
        assert eff["steps"] == 6 and eff["passes_per_step"] == passes
        assert eff["model_calls_per_chunk"] == [6 * passes]


def test_other_schedulers_run_their_steps(pipe, tmp_path):
    for name, steps, expected in (("unipc", 5, 5), ("dpm++", 3, 3), ("distill4", 9, 4)):
        counter = CallCounter(pipe.transformer)
        try:
            result = pipe.generate(_request(tmp_path, scheduler=name, steps=steps, text_scale=1.0, audio_scale=1.0,
                                            max_seconds=0.8, **SHORT))
        finally:
            counter.remove()
        assert counter.calls == expected
        assert result.sidecar["effective"]["scheduler_plan"]["fixed"] is (name == "distill4")


def test_whole_audio_by_default_and_max_seconds_caps(pipe, tmp_path, clips):
    one_pass = dict(steps=1, text_scale=1.0, audio_scale=1.0, **SHORT)
    result = pipe.generate(_request(tmp_path, audio=str(clips["s1_2s"]), **one_pass))
    samples = sf.info(clips["s1_2s"]).frames  # 16 kHz, 2 s
    assert result.frames == int(samples / 16000 * 25)  # the whole audio (3 chunks): no silent cap
    assert result.sidecar["output"]["chunks"] == 3  # 50 frames = 21 + 16 + 16 - trim
    assert probe_media(result.video_path).frames == result.frames
    capped = pipe.generate(_request(tmp_path, audio=str(clips["s1_2s"]), max_seconds=1.0, **one_pass))
    assert capped.frames == 25


@pytest.mark.slow
def test_whole_example_recording_at_the_default_chunk_length(pipe, tmp_path):
    """The long-audio run: all 10 s of the example speech in 81-frame chunks (4 chunks), then capped at 3 s."""
    result = pipe.generate(_request(tmp_path, steps=1, text_scale=1.0, audio_scale=1.0))
    samples = sf.info(EXAMPLES / "speech_en.wav").frames  # 16 kHz, ~10.12 s
    assert result.frames == int(samples / 16000 * 25)  # the whole audio: no silent cap
    assert probe_media(result.video_path).frames == result.frames
    capped = pipe.generate(_request(tmp_path, steps=1, text_scale=1.0, audio_scale=1.0, max_seconds=3.0))
    assert capped.frames == 75


def test_two_speakers_para_unequal_and_add(pipe, tmp_path, clips):
    first, second = clips["s1_1.2s"], clips["s2_0.8s"]  # 30 and 20 frames
    two = dict(audio=str(first), audio2=str(second), steps=1, **SHORT)
    para = pipe.generate(_request(tmp_path, audio_mode="para", **two))
    assert para.frames == 30 and para.sidecar["effective"]["speakers"] == 2  # the shorter track is padded (D6)
    full = pipe.generate(_request(tmp_path, audio_mode="add", text_scale=1.0, audio_scale=1.0, **two))
    n1, n2 = sf.info(first).frames, sf.info(second).frames
    assert full.frames == int((n1 + n2) / 16000 * 25)  # add: speaker 1, then speaker 2
    boxes = pipe.generate(_request(tmp_path, audio_mode="para", bbox=[[0, 0, 512, 256], [0, 256, 512, 512]],
                                   max_seconds=0.6, **two))
    assert boxes.frames == 15


@pytest.mark.slow
def test_two_speakers_added_over_the_whole_example_recordings(pipe, tmp_path):
    """The long-audio run: `add` of the two example speakers (10.1 s + 5.7 s) in 81-frame chunks (6 chunks)."""
    full = pipe.generate(_request(tmp_path, audio_mode="add", steps=1, text_scale=1.0, audio_scale=1.0,
                                  audio2=str(EXAMPLES / "speech_en_speaker2.wav")))
    n1, n2 = sf.info(EXAMPLES / "speech_en.wav").frames, sf.info(EXAMPLES / "speech_en_speaker2.wav").frames
    assert full.frames == int((n1 + n2) / 16000 * 25)  # add: speaker 1, then speaker 2
    assert probe_media(full.video_path).frames == full.frames


def test_video_dubbing_takes_keyframes_from_the_video(pipe, tmp_path, clips):
    result = pipe.generate(_request(tmp_path, image=None, video=str(EXAMPLES / "reference_video.mp4"),
                                    audio=str(clips["s1_2s"]), steps=1, color_correction=0.0, **SHORT))
    assert result.frames == 50 and result.sidecar["inputs"]["reference_is_video"] is True  # 3 chunks, 3 keyframes
    assert probe_media(result.video_path).frames == 50
    auto = pipe.generate(_request(tmp_path, image=None, video=str(EXAMPLES / "reference_video.mp4"),
                                  audio=str(clips["s1_2s"]), steps=1, max_seconds=0.6, **SHORT))
    assert auto.sidecar["requested"]["color_correction"] is None
    assert auto.sidecar["effective"]["color_correction"] == 0.0  # off by default for a video (D19)


def test_same_seed_same_video_and_seed_recorded(pipe, tmp_path):
    frames = {"a": [], "b": []}
    a = pipe.generate(_request(tmp_path, out=str(tmp_path / "a.mp4"), max_seconds=0.8, seed=None, **SHORT),
                      on_chunk=lambda k, f: frames["a"].append(f))
    assert isinstance(a.seed, int) and a.sidecar["seed"] == a.seed
    pipe.generate(_request(tmp_path, out=str(tmp_path / "b.mp4"), max_seconds=0.8, seed=a.seed, **SHORT),
                  on_chunk=lambda k, f: frames["b"].append(f))
    # the generated frames are identical (the mp4 bytes are not compared: x264's threads may order slices apart)
    assert len(frames["a"]) == len(frames["b"]) == 1
    assert frames["a"][0].shape == (20, 80, 80, 3)
    assert np.array_equal(frames["a"][0], frames["b"][0])


def test_sidecar_records_requested_and_effective(pipe, tmp_path):
    result = pipe.generate(_request(tmp_path, steps=3, max_seconds=0.8, **SHORT))
    sidecar = json.loads(result.sidecar_path.read_text())
    assert result.sidecar_path.name == "out.json"
    req, eff = sidecar["requested"], sidecar["effective"]
    assert req["steps"] == 3 and req["shift"] is None and req["scheduler"] == "euler"
    assert eff["steps"] == 3 and eff["shift"] == 7.0 and eff["scheduler"] == "euler"
    assert eff["text_scale"] == 5.0 and eff["audio_scale"] == 4.0 and eff["color_correction"] == 1.0
    assert eff["model_precision"] == "fp32" and eff["vae_precision"] == "fp32"
    assert eff["quantization"] == "disabled" and eff["attention"] == "sdpa-native"
    assert sidecar["load"]["requested"]["preset"] == "tiny"
    # the attention the plan names is the one set on every attention module, audio attention included
    backend = sidecar["load"]["effective"]["attention_backend"]
    block = pipe.transformer.blocks[0]
    for backend_of in (block.attn1.processor, block.attn2.processor, block.audio_cross_attn):
        assert backend_of._attention_backend.value == backend
    assert set(sidecar["timings_s"]) >= {"total_s", "denoise", "decode", "text_encoder_s"}
    assert sidecar["versions"]["infinite_talk"]


def test_errors_say_what_to_do(pipe, tmp_path):
    with pytest.raises(NotLoadedError, match="VAE is not loaded — load models first"):
        InfiniteTalkPipeline().generate(_request(tmp_path))
    with pytest.raises(InputError, match="missing.png: no such file"):
        pipe.generate(_request(tmp_path, image=str(tmp_path / "missing.png")))
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(InputError, match="short.wav"):
        pipe.generate(_request(tmp_path, audio=str(short)))
    with pytest.raises(InputError, match="box 1 .* lies outside the 512×512 reference image"):
        pipe.generate(_request(tmp_path, audio2=str(EXAMPLES / "speech_zh.wav"), bbox=[[0, 0, 600, 100],
                                                                                        [0, 0, 10, 10]]))
    with pytest.raises(InputError, match="exactly one reference"):
        pipe.generate(_request(tmp_path, image=None))


def test_cli_generate_dry_run_and_refusals(cache, tmp_path, clips, capsys):
    out = tmp_path / "cli.mp4"
    code = cli_main(["generate", "--preset", "tiny", "--image", str(EXAMPLES / "portrait.png"), "--audio",
                     str(clips["s1_1s"]), "--steps", "1", "--text-scale", "1", "--audio-scale", "1", *SHORT_FLAGS,
                     "--out", str(out)])
    assert code == 0 and probe_media(out).frames == 25
    assert json.loads(out.with_suffix(".json").read_text())["effective"]["steps"] == 1
    code = cli_main(["generate", "--preset", "tiny", "--quantization", "fp4", "--image", str(EXAMPLES / "portrait.png"),
                     "--audio", str(clips["s1_1s"]), "--out", str(tmp_path / "q.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "error: quantization=fp4" in err and "Traceback" not in err
    code = cli_main(["generate", "--dry-run", "--steps", "6", "--text-scale", "1", "--audio-scale", "2"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["steps"] == 6 and plan["passes_per_step"] == 2


def test_cli_reference_input_json(cache, tmp_path, clips, capsys):
    spec = {"prompt": "A woman is talking", "cond_video": str(EXAMPLES / "portrait.png"),
            "cond_audio": {"person1": str(clips["s1_1s"])}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    code = cli_main(["generate", "--preset", "tiny", "--input-json", str(path), "--steps", "1", *SHORT_FLAGS,
                     "--out", str(tmp_path / "j.mp4")])
    assert code == 0
    sidecar = json.loads((tmp_path / "j.json").read_text())
    assert sidecar["requested"]["prompt"] == "A woman is talking"
    spec["cond_audio"] = {"person1": str(clips["s1_1s"]), "person2": str(clips["s1_1s"]),
                          "person3": str(clips["s1_1s"])}
    path.write_text(json.dumps(spec))
    code = cli_main(["generate", "--preset", "tiny", "--input-json", str(path), "--out", str(tmp_path / "k.mp4")])
    assert code == 2 and "3 speakers given; InfiniteTalk supports one or two speakers" in capsys.readouterr().err


def test_load_refuses_unknown_and_unavailable_options():
    with pytest.raises(OptionError, match="attention: unknown value 'sageattn_3_fp4'"):
        InfiniteTalkPipeline().load_models(LoadOptions(preset="tiny", attention="sageattn_3_fp4"))
    with pytest.raises(OptionError, match="attention=sageattn_3: needs"):
        InfiniteTalkPipeline().load_models(LoadOptions(preset="tiny", attention="sageattn_3"))
