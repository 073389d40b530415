"""Sequence-parallel generation over 2 processes (torchrun, gloo, CPU) on the tiny preset: the same forwards and
frames as one process, rank 0 alone writes, refusals, and a failing process ending the job with its message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from infinite_talk.cli import main as cli_main
from infinite_talk.errors import OptionError
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.parallel.launch import World, world_from_env
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import probe
from infinite_talk.testing.machines import simulated

TESTS = Path(__file__).parent
EXAMPLES = TESTS / "data" / "examples"
JOB = TESTS / "parallel_job.py"
sys.path.insert(0, str(TESTS))
from parallel_job import FORWARD_CASES, pipeline_request, skip_after_warmup  # noqa: E402

TIMEOUT = 300


def _env(cache: Path, **extra) -> dict:
    # the same CPU threads as this process: the single-process references below run here
    return dict(os.environ, INFINITE_TALK_CACHE=str(cache), OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)


def _torchrun(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two seconds of each example speaker (two chunks of 41 frames)."""
    folder = tmp_path_factory.mktemp("speech")
    paths = []
    for name in ("speech_en.wav", "speech_zh.wav"):
        data, rate = sf.read(EXAMPLES / name, dtype="float32")
        sf.write(folder / name, data[: 2 * rate], rate)
        paths.append(str(folder / name))
    return paths


@pytest.fixture(scope="module")
def pipe(cache):
    p = InfiniteTalkPipeline()
    p.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    return p


def _frames_of(pipe, request) -> tuple[np.ndarray, dict]:
    frames = []
    result = pipe.generate(request, on_chunk=lambda k, f: frames.append(np.array(f)))
    return np.concatenate(frames), result.sidecar


def test_forwards_match_one_process(tmp_path):
    """Ulysses and ring, one and two speakers, slices cutting latent frames, unequal slices, and the first frame
    split over both processes: the gathered output equals the single-process forward (fp32)."""
    out = tmp_path / "forward.json"
    run = _torchrun([str(JOB), "forward", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(out.read_text())
    assert set(errors) == {case[0] for case in FORWARD_CASES}
    assert all(e < 1e-5 for e in errors.values()), errors


def test_pipeline_frames_match_one_process_two_speakers_teacache(pipe, cache, tmp_path, speech, monkeypatch):
    """The whole chunk loop on two processes (rank 0: encoders, VAE, loop; rank 1: transformer only), with TeaCache
    skipping the blocks on every process alike: the same raw frames and skips as one process."""
    monkeypatch.setattr("infinite_talk.sampling.step_cache.DEFAULT_THRESHOLD", {"teacache": 0.2, "firstblock": 0.05})
    skip_after_warmup()
    image = str(EXAMPLES / "portrait_landscape.png")
    reference, sidecar = _frames_of(pipe, pipeline_request(image, *speech, str(tmp_path / "one.mp4")))
    assert sidecar["effective"]["speakers"] == 2 and sidecar["effective"]["cache_skips"] > 0

    out = tmp_path / "two.npy"
    run = _torchrun([str(JOB), "pipeline", str(out), image, *speech], cache)
    assert run.returncode == 0, run.stderr[-3000:]
    frames = np.load(out)
    parallel = json.loads(out.with_suffix(".json").read_text())["effective"]
    assert frames.shape == reference.shape and np.array_equal(frames, reference)
    assert parallel["cache_skips_per_chunk"] == sidecar["effective"]["cache_skips_per_chunk"]
    assert parallel["model_calls"] == sidecar["effective"]["model_calls"]
    assert parallel["sequence_parallel"] == "ulysses 2 × ring 1 over 2 processes (gloo)"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _decoded(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_torchrun_cli_writes_one_mp4_from_rank_0(pipe, cache, tmp_path, speech):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["--image", str(EXAMPLES / "portrait.png"), "--audio", speech[0], "--steps", "3", "--text-scale", "1",
            "--audio-scale", "1", "--seed", "5", "--frame-num", "41", "--motion-frames", "5"]
    run = _torchrun(["-m", "infinite_talk.cli", "generate", "--preset", "tiny", "--model-precision", "fp32",
                     "--vae-precision", "fp32", *args, "--out", str(out_dir / "two.mp4")], cache)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "sequence_parallel: auto → ulysses 2 × ring 1 over 2 processes (gloo)" in run.stderr
    assert run.stdout.count("wrote ") == 1  # rank 0 only
    assert sorted(p.name for p in out_dir.iterdir()) == ["two.json", "two.mp4"]
    sidecar = json.loads((out_dir / "two.json").read_text())
    assert sidecar["status"] == "completed" and sidecar["load"]["effective"]["world_size"] == 2

    # 525 tokens per chunk (21 x 25): unequal slices; the frames equal one process's up to H.264's loss (a
    # different video scores ~10 dB against them, the same one ~24 dB)
    reference, _ = _frames_of(pipe, GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=speech[0], steps=3,
                                                    text_scale=1, audio_scale=1, seed=5, frame_num=41,
                                                    motion_frames=5, out=str(tmp_path / "one.mp4")))
    decoded = _decoded(out_dir / "two.mp4")
    assert decoded.shape == reference.shape == (50, 80, 80, 3)
    assert _psnr(decoded, reference) > 20


def _spawn(cmd: list[str], envs: list[dict]) -> list[subprocess.Popen]:
    """Start the processes of a 2-process job as torchrun would (RANK, WORLD_SIZE, ...), each with its own env."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(cmd, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, env in enumerate(envs)]


def _broken_copy(cache: Path, target: Path) -> Path:
    """The tiny model files with the first transformer shard cut in half (as a node with a bad download)."""
    import shutil

    source = cache / "tiny-v1"
    shutil.copytree(source, target / "tiny-v1")
    files = json.loads((target / "tiny-v1" / "files.json").read_text().replace(str(source), str(target / "tiny-v1")))
    (target / "tiny-v1" / "files.json").write_text(json.dumps(files))
    shard = sorted(Path(files["transformer"][0]).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def test_a_failing_process_ends_the_job_with_its_message(pipe, cache, tmp_path, speech):
    shard = _broken_copy(cache, tmp_path / "node2")
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "infinite_talk.cli", "generate", "--preset", "tiny", "--image",
           str(EXAMPLES / "portrait.png"), "--audio", speech[0], "--steps", "2", "--out", str(out)]
    procs = _spawn(cmd, [_env(cache), _env(tmp_path / "node2")])
    (_, err0), (_, err1) = (p.communicate(timeout=TIMEOUT) for p in procs)
    assert procs[1].returncode == 2 and "Traceback" not in err1
    assert f"error: process 1 of 2: {shard}: file is truncated" in err1
    assert procs[0].returncode == 2 and "Traceback" not in err0
    assert "error: another process of the job has stopped" in err0 and "no frame was finished" in err0
    assert not out.exists() and json.loads(out.with_suffix(".json").read_text())["status"] == "failed"


def test_rank_0_keeps_finished_chunks_when_a_process_dies(pipe, cache, tmp_path):
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "infinite_talk.cli", "generate", "--preset", "tiny", "--image",
           str(EXAMPLES / "portrait.png"), "--audio", str(EXAMPLES / "speech_en.wav"), "--max-seconds", "4",
           "--frame-num", "41", "--motion-frames", "5", "--steps", "30", "--text-scale", "1", "--audio-scale", "1",
           "--out", str(out)]
    procs = _spawn(cmd, [_env(cache), _env(cache)])
    try:
        for line in procs[0].stderr:  # progress lines: kill rank 1 once chunk 2 of 3 runs
            if line.startswith("chunk 2/3"):
                procs[1].send_signal(signal.SIGKILL)
                break
        err0 = procs[0].stderr.read()
        procs[0].wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 2 and "Traceback" not in err0
    assert "error: another process of the job" in err0 and f"the 41 finished frames are kept in {out}" in err0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "failed" and sidecar["output"]["chunks_done"] == 1
    assert probe_media(out).frames == 41


# ---- refusals (no processes needed) --------------------------------------------------------------------------------
def test_split_must_fit_the_launcher_and_the_heads():
    caps = simulated("h100")
    with pytest.raises(OptionError, match=r"^ulysses=2: sequence parallel needs several processes started by a "
                                          r"launcher, e\.g\. torchrun --nproc-per-node 2 .*this is a single process"):
        resolve(LoadOptions(ulysses=2), caps, World())
    with pytest.raises(OptionError, match=r"^ulysses=2 ring=2: ulysses × ring must equal the number of processes "
                                          r"\(2, from the launcher\); 2 × 2 = 4"):
        resolve(LoadOptions(ulysses=2, ring=2), caps, World(0, 2, 0))
    with pytest.raises(OptionError, match=r"^ulysses=4: the model's 2 attention heads must divide by ulysses"):
        resolve(LoadOptions(preset="tiny", device="cpu"), probe(), World(0, 4, 0))
    with pytest.raises(OptionError, match=r"^ulysses=3 ring=2: the model's 40 attention heads must divide by ulysses"):
        resolve(LoadOptions(ulysses=3, ring=2), caps, World(0, 6, 0))
    plan = resolve(LoadOptions(ulysses=8, ring=2), caps, World(0, 16, 0))
    assert (plan.ulysses, plan.ring, plan.world_size, plan.dist_backend) == (8, 2, 16, "nccl")
    assert plan.device == "cuda:0"
    with pytest.raises(OptionError, match=r"^device=cuda:1: in a torchrun job each process uses the GPU of its "
                                          "LOCAL_RANK"):
        resolve(LoadOptions(device="cuda:1"), caps, World(0, 2, 0))
    with pytest.raises(OptionError, match=r"^device=auto: needs a GPU per process on this node \(LOCAL_RANK 1\)"):
        resolve(LoadOptions(), caps, World(1, 2, 1))


def test_plan_line_and_ring_attention_needs_the_log_sum_exp():
    caps = simulated("h100")
    plan = resolve(LoadOptions(), caps, World(0, 2, 0))
    assert plan.options["sequence_parallel"].effective == "ulysses 2 × ring 1 over 2 processes (nccl)"
    assert plan.attention_kernel == "flash_attn_3"  # Ulysses runs around any kernel
    assert "Ulysses all-to-all around flash_attn_3" in plan.options["sequence_parallel"].reason
    ring = resolve(LoadOptions(ring=2), caps, World(0, 2, 0))
    assert (ring.ulysses, ring.ring, ring.attention_kernel) == (1, 2, "sdpa-cudnn")
    assert "ring attention needs the log-sum-exp, which flash_attn_3 does not return" in \
        ring.options["attention"].reason
    with pytest.raises(OptionError, match=r"^attention=flash_attn_3: ring attention \(ring=2\) merges partial "
                                          "results by their log-sum-exp"):
        resolve(LoadOptions(ring=2, attention="flash_attn_3"), caps, World(0, 2, 0))
    with pytest.raises(OptionError, match=r"^ring=2: needs an attention kernel returning its log-sum-exp for fp32"):
        resolve(LoadOptions(ring=2, model_precision="fp32"), caps, World(0, 2, 0))
    single = resolve(LoadOptions(preset="tiny", device="cpu"), probe(), World())
    assert single.options["sequence_parallel"].effective == "off" and single.world_size == 1
    cpu = resolve(LoadOptions(preset="tiny", device="cpu", ring=2), probe(), World(0, 2, 0))
    assert cpu.options["sequence_parallel"].effective == "ulysses 1 × ring 2 over 2 processes (gloo)"


def test_cli_refuses_a_split_without_a_launcher(cache, capsys, tmp_path):
    assert world_from_env() == World()
    code = cli_main(["generate", "--preset", "tiny", "--ulysses", "2", "--image", str(EXAMPLES / "portrait.png"),
                     "--audio", str(EXAMPLES / "speech_en.wav"), "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: ulysses=2: sequence parallel needs several processes started by a launcher" in err
    assert not (tmp_path / "x.mp4").exists()


def test_firstblock_cache_is_refused_across_processes():
    from infinite_talk.parallel.peers import Leader

    class Split:
        @staticmethod
        def describe():
            return "ulysses 2 × ring 1 over 2 processes"

    leader = Leader(World(0, 2, 0), Split())
    with pytest.raises(OptionError, match=r"^step_cache=firstblock: decides from the first block's output"):
        leader.check_request(GenerateOptions(step_cache="firstblock"))
    leader.check_request(GenerateOptions(step_cache="teacache"))
