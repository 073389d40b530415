"""Deterministic output (issue 15): the same frames give the same mp4 bytes (10 encodes, any chunking, any CPU
count), the CLI's sidecar records `frames_sha256` as the job service computes it, and a job resumed from its
checkpoint gives the byte-identical mp4 of an unbroken run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from infinite_talk.cli import main as cli_main
from infinite_talk.media.frames_hash import FramesHash
from infinite_talk.media.mp4 import X264_THREADS, write_mp4
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.service.checkpoint import JobCheckpoint

EXAMPLES = Path(__file__).parent / "data" / "examples"


def _frames_and_audio():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (1, 256, 320, 3), dtype=np.uint8)  # large enough for x264 to use threads
    drift = np.arange(30, dtype=np.uint8)[:, None, None, None]
    frames = base + drift  # a moving picture (wraps around: still uint8)
    audio = (0.1 * rng.standard_normal((2, 16000 * 2))).astype(np.float32)
    return frames, audio


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ENCODE_SCRIPT = """
import os, sys
import numpy as np
os.sched_setaffinity(0, {0})  # one CPU: x264's default thread (and slice) count follows the usable CPUs
from infinite_talk.media.mp4 import X264_THREADS, write_mp4
data = np.load(sys.argv[1])
write_mp4(sys.argv[2], data["frames"], audio=(data["audio"], 16000))
"""


def test_the_same_frames_give_the_same_mp4_bytes_ten_times(tmp_path):
    frames, audio = _frames_and_audio()
    splits = [[30], [1, 29], [9, 8, 13], [15, 15], [29, 1], [3] * 10, [30], [7, 23], [10, 10, 10], [2, 28]]
    digests = set()
    for i, sizes in enumerate(splits):
        bounds = np.cumsum([0, *sizes])
        chunks = [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        digests.add(_sha(write_mp4(tmp_path / f"{i}.mp4", iter(chunks), audio=(audio, 16000))))
    assert len(digests) == 1
    np.savez(tmp_path / "in.npz", frames=frames, audio=audio)
    subprocess.run([sys.executable, "-c", ENCODE_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "one_cpu.mp4")],
                   check=True, timeout=120)
    assert _sha(tmp_path / "one_cpu.mp4") in digests
    data = (tmp_path / "0.mp4").read_bytes()
    assert b"Lavf" not in data  # bitexact: no library version in the file
    assert f" threads={X264_THREADS} ".encode() in data  # x264's own record of its settings


def test_cli_sidecar_records_frames_sha256_of_the_generated_frames(cache, tmp_path, monkeypatch, capsys):
    import infinite_talk.pipeline as pipeline_module

    seen = FramesHash()
    original = pipeline_module.InfiniteTalkPipeline.generate

    def generate(self, request, **kw):  # the frames as generated, hashed here independently of the pipeline
        return original(self, request, on_chunk=lambda k, frames: seen.update(frames), **kw)

    monkeypatch.setattr(pipeline_module.InfiniteTalkPipeline, "generate", generate)
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    sf.write(tmp_path / "a.wav", data[: rate // 2], rate)
    out = tmp_path / "o.mp4"
    code = cli_main(["generate", "--preset", "tiny", "--image", str(EXAMPLES / "portrait.png"), "--audio",
                     str(tmp_path / "a.wav"), "--steps", "1", "--frame-num", "9", "--motion-frames", "1", "--seed", "2",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["output"]["frames_sha256"] == seen.hexdigest()


@pytest.fixture(scope="module")
def pipe(cache):
    p = InfiniteTalkPipeline()
    p.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    return p


class Killed(BaseException):
    """Stands for kill -9 right after a checkpoint: nothing of the run's own clean-up is trusted afterwards."""


def test_a_resumed_job_gives_the_byte_identical_mp4_of_an_unbroken_run(pipe, tmp_path):
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    sf.write(tmp_path / "a.wav", data[:rate], rate)
    base = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(tmp_path / "a.wav"), steps=1,
                           frame_num=9, motion_frames=1, seed=11)

    (tmp_path / "whole").mkdir()  # a checkpoint lives in its job's folder, which the store makes
    whole = JobCheckpoint(tmp_path / "whole")
    unbroken = pipe.generate(dataclasses.replace(base, out=str(tmp_path / "whole.mp4")), on_checkpoint=whole.save)
    assert unbroken.sidecar["output"]["chunks"] == 3

    for stop_after in (1,):  # killed after chunk 1 of 3: chunks 2 and 3 run in the resumed process
        folder = tmp_path / f"job{stop_after}"
        folder.mkdir()
        checkpoint = JobCheckpoint(folder)
        out = str(folder / "output.mp4")

        def save_then_die(state, frames, checkpoint=checkpoint, stop_after=stop_after):
            checkpoint.save(state, frames)
            if state.next_chunk == stop_after:
                raise Killed

        with pytest.raises(Killed):
            pipe.generate(dataclasses.replace(base, out=out), on_checkpoint=save_then_die)
        resume = checkpoint.load()
        assert resume is not None and resume.next_chunk == stop_after
        resumed = pipe.generate(dataclasses.replace(base, out=out), on_checkpoint=checkpoint.save, resume=resume)
        assert resumed.sidecar["output"]["resumed_from_chunk"] == stop_after
        assert resumed.sidecar["output"]["frames_sha256"] == unbroken.sidecar["output"]["frames_sha256"]
        assert _sha(Path(out)) == _sha(tmp_path / "whole.mp4")
