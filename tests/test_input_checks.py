"""The request check (issue 21): every bad input or output is refused before any model weight is read, with a
one-line message and nothing left behind; image modes are converted as a viewer shows them; interrupts and failures
say what exists; a prompt cut at the encoder's limit is stated; library noise is filtered."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import infinite_talk.media.request_check as request_check
import infinite_talk.pipeline as pipeline_module
from infinite_talk.cli import main as cli_main
from infinite_talk.errors import InputError, Interrupted, StorageError
from infinite_talk.library_messages import filter_library_noise
from infinite_talk.media.frames import check_boxes, read_image
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline

EXAMPLES = Path(__file__).parent / "data" / "examples"
PORTRAIT = str(EXAMPLES / "portrait.png")
FAST = ["--steps", "1", "--frame-num", "9", "--motion-frames", "1", "--text-scale", "1", "--audio-scale", "1"]


@pytest.fixture(scope="module")
def one_second(tmp_path_factory):
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "one_second.wav"
    sf.write(path, data[:rate], rate)
    return path


@pytest.fixture
def loader_calls(monkeypatch):
    """Every call of the model loader, recorded; the loader itself is never reached in these tests."""
    calls = []

    def record(self, options, progress=None):
        calls.append(options)
        raise AssertionError("models were loaded although the request check should have refused the request")

    monkeypatch.setattr(pipeline_module.InfiniteTalkPipeline, "load_models", record)
    return calls


def _cli(args, capsys):
    started = time.monotonic()
    code = cli_main(["generate", "--preset", "tiny", *args])
    err = capsys.readouterr().err
    return code, err, time.monotonic() - started


def _refused(capsys, loader_calls, args, message, out: Path):
    code, err, seconds = _cli([*args, "--out", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and loader_calls == []
    assert not out.exists() and not out.with_suffix(".json").exists()
    return seconds


def test_bad_inputs_are_refused_before_any_model_is_loaded(tmp_path, capsys, loader_calls, one_second):
    out = tmp_path / "o.mp4"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    text_audio = tmp_path / "notes.wav"
    text_audio.write_text("these are not samples\n" * 20)
    many = tmp_path / "65ch.wav"
    sf.write(many, np.zeros((1600, 65), np.float32), 16000)
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--audio", str(one_second)], "missing.png: no such file"),
        (["--image", str(tmp_path), "--audio", str(one_second)], "is a folder, not a file"),
        (["--image", str(corrupt), "--audio", str(one_second)], "corrupt.png: not a readable image"),
        (["--image", PORTRAIT, "--audio", str(tmp_path / "nope.wav")], "nope.wav: no such file"),
        (["--image", PORTRAIT, "--audio", str(text_audio)], "notes.wav: cannot decode audio"),
        (["--image", PORTRAIT, "--audio", str(many)], "65ch.wav: the audio has 65 channels; at most 64"),
        (["--image", PORTRAIT, "--audio", str(one_second), "--audio2", str(one_second), "--bbox", "0", "0", "600",
          "100", "--bbox", "0", "0", "10", "10"], "box 1 [0, 0, 600, 100] lies outside the 512×512 reference"),
        (["--image", PORTRAIT, "--video", str(EXAMPLES / "reference_video.mp4"), "--audio", str(one_second)],
         "give exactly one reference"),
        (["--image", str(EXAMPLES / "reference_video.mp4"), "--audio", str(one_second)],
         "reference_video.mp4: is a video; pass it as --video"),
    ]
    for args, message in cases:
        _refused(capsys, loader_calls, args, message, out)


def test_unwritable_or_wrong_outputs_are_refused_before_loading(tmp_path, capsys, loader_calls, one_second):
    inputs = ["--image", PORTRAIT, "--audio", str(one_second)]
    seconds = _refused(capsys, loader_calls, inputs, "/proc/x.mp4: cannot write the output", Path("/proc/x.mp4"))
    print(f"--out /proc/x.mp4 refused in {seconds:.2f} s (in-process)")
    _refused(capsys, loader_calls, inputs, "the output must be an .mp4 file", tmp_path / "o.avi")
    folder = tmp_path / "taken.mp4"
    folder.mkdir()
    code, err, _ = _cli([*inputs, "--out", str(folder)], capsys)
    assert code == 2 and "taken.mp4: is a folder" in err and loader_calls == []
    video = tmp_path / "dub.mp4"
    video.write_bytes((EXAMPLES / "reference_video.mp4").read_bytes())
    code, err, _ = _cli(["--video", str(video), "--audio", str(one_second), "--out", str(video)], capsys)
    assert code == 2 and "the output would overwrite the input" in err and loader_calls == []
    assert video.read_bytes() == (EXAMPLES / "reference_video.mp4").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".infinite-talk-probe")]  # probe removed


def test_a_read_only_output_folder_is_refused_before_loading(tmp_path, capsys, loader_calls, one_second,
                                                             monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only mount answers (root ignores permission bits)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(request_check.tempfile, "mkstemp", read_only)
    _refused(capsys, loader_calls, ["--image", PORTRAIT, "--audio", str(one_second)],
             f"a test file cannot be written in {tmp_path} (Read-only file system)", tmp_path / "new" / "o.mp4")
    assert not (tmp_path / "new").exists()  # a missing output folder is made only for a run that starts


def test_a_full_disk_is_refused_with_the_estimate(tmp_path, capsys, loader_calls, one_second, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(request_check.shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    _refused(capsys, loader_calls, ["--image", PORTRAIT, "--audio", str(one_second)],
             "the run writes about 17 MiB but", tmp_path / "o.mp4")
    request = GenerateOptions(image=PORTRAIT, audio=str(one_second), out=str(tmp_path / "o.mp4"))
    with pytest.raises(StorageError, match="free some space"):  # a service may retry this one later
        request_check.check_request(request)
    monkeypatch.undo()
    plain = request_check.check_request(request)
    kept = request_check.check_request(request, checkpoint=True)  # the service keeps raw frames per chunk
    assert plain.frames == 25 and kept.output_bytes - plain.output_bytes == 25 * 640 * 640 * 3


def test_image_modes_are_converted_as_shown(tmp_path):
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(read_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01  # PIL's own convert clips ~100% of these pixels to 255

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(read_image(tmp_path / "alpha.png"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[-1, -1]) == (255, 255, 255)

    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "pal.png", transparency=1)
    assert tuple(np.asarray(read_image(tmp_path / "pal.png"))[5, 5]) == (255, 255, 255)

    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(read_image(tmp_path / "cmyk.jpg"))[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full = red

    wide = Image.new("RGB", (60, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to show
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").size == (20, 60)
    info = request_check.check_reference(tmp_path / "rotated.jpg")
    assert (info.width, info.height) == (20, 60)
    with pytest.raises(InputError, match="box 1 .* lies outside the 20×60 reference"):
        check_boxes([[0, 0, 30, 30]], 1, info.height, info.width)


def test_interrupt_during_loading_says_nothing_was_made(tmp_path, capsys, monkeypatch, one_second):
    def interrupted(self, options, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module.InfiniteTalkPipeline, "load_models", interrupted)
    out = tmp_path / "o.mp4"
    code, err, _ = _cli(["--image", PORTRAIT, "--audio", str(one_second), "--out", str(out)], capsys)
    assert code == 130 and "interrupted before any frame was generated; no video was written" in err
    assert "kept" not in err and not out.exists() and not out.with_suffix(".json").exists()


def test_interrupt_during_sampling_keeps_a_valid_video_and_says_where(cache, tmp_path, capsys, monkeypatch,
                                                                      one_second):
    import infinite_talk.cli as cli_module

    def stop_at_chunk_two():
        def show(info):
            if info["chunk"] == 2:
                raise KeyboardInterrupt
        return show

    monkeypatch.setattr(cli_module, "_progress_printer", stop_at_chunk_two)
    scans, check_audio = [], request_check.check_audio
    monkeypatch.setattr(request_check, "check_audio", lambda *a, **k: scans.append(a) or check_audio(*a, **k))
    out = tmp_path / "o.mp4"
    code, err, _ = _cli(["--image", PORTRAIT, "--audio", str(one_second), *FAST, "--out", str(out)], capsys)
    assert code == 130, err
    assert len(scans) == 1  # checked once before loading; the pipeline takes that check instead of scanning again
    assert err.splitlines()[-1] == (f"interrupted (Ctrl-C / SIGINT); the 9 finished frames are kept in {out}; the "
                                    f"record is in {out.with_suffix('.json')}")
    assert probe_media(out).frames == 9  # a valid mp4 of the first chunk
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "interrupted" and "KeyboardInterrupt" not in json.dumps(sidecar)
    assert sidecar["output"]["frames"] == 9


@pytest.fixture(scope="module")
def pipe(cache):
    p = InfiniteTalkPipeline()
    p.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    return p


def test_a_prompt_over_512_tokens_is_cut_and_says_so_and_is_stored_once(pipe, tmp_path, one_second):
    prompt = " ".join(f"word{i % 50}" for i in range(20_000))  # ~100,000 characters
    result = pipe.generate(GenerateOptions(image=PORTRAIT, audio=str(one_second), prompt=prompt, steps=1,
                                           frame_num=9, motion_frames=1, seed=3, out=str(tmp_path / "p.mp4")))
    tokens = result.sidecar["effective"]["prompt_tokens"]
    assert tokens["limit"] == 512 and tokens["prompt"]["tokens"] > 512 and tokens["prompt"]["used"] == 512
    assert any("the prompt has" in n and "reads only the first 512" in n for n in result.sidecar["notes"])
    text = result.sidecar_path.read_text()
    assert text.count(prompt) == 1 and len(text) < len(prompt) + 50_000


def test_an_interrupted_run_records_what_exists_and_a_failure_names_the_kept_file(pipe, tmp_path, one_second):
    request = GenerateOptions(image=PORTRAIT, audio=str(one_second), steps=1, frame_num=9, motion_frames=1, seed=3,
                              out=str(tmp_path / "i.mp4"))

    def stop(k, frames):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"the 17 finished frames are kept in .*i\.mp4; the record is in"):
        pipe.generate(request, on_chunk=stop)
    assert probe_media(tmp_path / "i.mp4").frames == 17
    assert json.loads((tmp_path / "i.json").read_text())["status"] == "interrupted"

    def broken(k, frames):
        raise RuntimeError("disk controller on fire")

    request = dataclasses.replace(request, out=str(tmp_path / "f.mp4"))
    with pytest.raises(RuntimeError) as err:
        pipe.generate(request, on_chunk=broken)
    assert err.value.__notes__ == [f"the 9 finished frames are kept in {tmp_path / 'f.mp4'}"]
    assert probe_media(tmp_path / "f.mp4").frames == 9


def test_a_video_that_cannot_be_finished_is_reported_not_claimed(pipe, tmp_path, one_second, monkeypatch):
    from infinite_talk.media.mp4 import Mp4Writer

    def disk_full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Mp4Writer, "close", disk_full)
    out = tmp_path / "full.mp4"
    request = GenerateOptions(image=PORTRAIT, audio=str(one_second), steps=1, frame_num=9, motion_frames=1, seed=3,
                              out=str(out))
    with pytest.raises(InputError, match=r"the 25 generated frames could not be saved: .*full\.mp4 could not be "
                                         r"finished \(OSError: .*No space left on device\)"):
        pipe.generate(request)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "failed" and sidecar["output"]["video_saved"] is False


def test_library_noise_is_filtered_and_other_warnings_still_show():
    filter_library_noise()

    def shown(name: str, msg: str, *args) -> str | None:
        """What the logger lets through (its filters decide; diffusers' loggers do not propagate to caplog)."""
        logger = logging.getLogger(name)
        record = logger.makeRecord(name, logging.WARNING, __file__, 1, msg, args, None)
        return record.getMessage() if logger.filter(record) else None

    assert shown("diffusers.models.modeling_utils", "Attention backends are an experimental feature and the API "
                 "may be subject to change.") is None
    assert shown("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library") is None
    assert shown("torch.utils._pytree", "%s is an Enum subclass and is now natively supported", "Kernel") is None
    assert shown("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects. This "
                 "may affect loading checkpoints serialized with `torchao`") is None
    assert shown("diffusers.models.modeling_utils", "some other warning") == "some other warning"
    assert shown("torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton certain kernels "
                 "will not work").startswith("note: Triton is not installed")
    assert shown("torchao", "Skipping import of cpp extensions due to incompatible torch version. Please upgrade to "
                 "torch >= 2.11.0 (found 2.10).").startswith("note: the installed torchao does not match this torch")


def test_importing_the_model_libraries_prints_no_noise():
    code = ("from infinite_talk.library_messages import filter_library_noise; import sys\n"
            "if sys.argv[1] == 'filtered': filter_library_noise()\n"
            "import infinite_talk.pipeline, diffusers.quantizers.torchao.torchao_quantizer\n")
    noise = ("Failed to load", "is an Enum subclass", "Unable to import `torchao` Tensor objects")
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
            for mode in ("plain", "filtered")}
    assert runs["filtered"].returncode == 0, runs["filtered"].stderr
    assert not [n for n in noise if n in runs["filtered"].stderr], runs["filtered"].stderr
    if not any(n in runs["plain"].stderr for n in noise):
        pytest.skip("the installed libraries print none of the filtered messages")
