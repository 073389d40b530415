"""The newcomer path (README "Start here"): the install and test commands CI runs, the first video with the tiny
preset, one line saying what to download when there are no models and no network, and no library warnings at the
start of `generate`, `ui` and `serve`."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import soundfile as sf

from infinite_talk.model_files import HUB_REPOS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI = [sys.executable, "-m", "infinite_talk.cli"]
START_S = 300  # bound on a server's start on a busy 2-core machine (a hang fails the test instead of blocking it)
# A line printed by a library warning: Python's warnings ("…/site-packages/x.py:12: FutureWarning: …"), a logging
# WARNING record, or a library's own "Warning: …" text.
WARNING_LINE = re.compile(r"\w*Warning\b|\bWARNING\b|site-packages/")


def _start_blocks() -> list[str]:
    """The bash blocks of the README's first section, before 'Make a video'."""
    text = README.read_text()
    start = text[: text.index("\n## Make a video")]
    return re.findall(r"```bash\n(.*?)```", start, flags=re.S)


def _commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_opens_with_the_install_and_test_commands_that_ci_runs():
    blocks = _start_blocks()
    assert len(blocks) == 2, "Start here: the install + test block, then the first-video block"
    install, test = _commands(blocks[0])
    assert install == 'pip install -e ".[all]"'
    assert test == "python3 -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"python3 -m {install.replace(' -e', ' --quiet -e')}" in ci
    assert f"\n{test}\n" in ci
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["all"] == ["infinite_talk[test,quant,ui,service]"]
    assert {"test", "quant", "ui", "service"} <= set(extras)


def test_readme_first_video_command_makes_the_video(tmp_path, cache):
    (command,) = _commands(_start_blocks()[1])
    argv = shlex.split(command)
    assert argv[:2] == ["infinite-talk", "generate"] and "--preset" in argv and argv[argv.index("--preset") + 1] == "tiny"
    audio = ROOT / argv[argv.index("--audio") + 1]
    assert (ROOT / argv[argv.index("--image") + 1]).is_file() and audio.is_file()
    out = tmp_path / "first.mp4"
    argv[argv.index("--out") + 1] = str(out)  # the README's command, writing into the test's folder
    max_s = float(argv[argv.index("--max-seconds") + 1]) if "--max-seconds" in argv else float("inf")
    run = subprocess.run(CLI + argv[1:], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert not _warning_lines(run.stdout + run.stderr), run.stderr

    info = sf.info(audio)
    seconds = min(info.frames / info.samplerate, max_s)
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        rate = video.average_rate
        container.seek(0)
        audio_stream = container.streams.audio[0]
        audio_s = sum(f.samples for f in container.decode(audio_stream)) / audio_stream.rate
    assert rate == 25
    assert frames == round(seconds * 25)
    assert abs(audio_s - seconds) < 0.05
    assert f"({frames} frames, {seconds:.2f} s" in run.stdout
    assert out.with_suffix(".json").is_file()


def _offline_env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "INFINITE_TALK_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


def _no_models_args(command: str, tmp_path: Path) -> list[str]:
    examples = ROOT / "tests" / "data" / "examples"
    if command == "generate":
        return ["generate", "--image", str(examples / "portrait.png"), "--audio", str(examples / "speech_en.wav"),
                "--out", str(tmp_path / "talk.mp4")]
    if command == "ui":
        return ["ui", "--port", str(_free_port()), "--output-dir", str(tmp_path / "outputs")]
    return ["serve", "--port", str(_free_port()), "--data-dir", str(tmp_path / "jobs")]


def _assert_one_line_what_to_download(run: subprocess.CompletedProcess, reason: str):
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: no model files, and they cannot be downloaded (" + reason)
    for repo in HUB_REPOS.values():
        assert repo in line
    assert "pass --models-dir DIR" in line and "HF_HUB_OFFLINE=1" in line and "--preset tiny" in line
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", ["generate", "ui", "serve"])
def test_no_models_and_no_network_says_what_to_download(command, tmp_path):
    env = _offline_env(tmp_path, HF_HUB_OFFLINE="1")  # no network, and an empty hub cache
    run = subprocess.run(CLI + _no_models_args(command, tmp_path), env=env, capture_output=True, text=True,
                         timeout=300)
    _assert_one_line_what_to_download(run, "HF_HUB_OFFLINE is set")
    assert str(tmp_path / "hf_home" / "hub") in run.stderr  # the cache it looked in
    assert not (tmp_path / "talk.mp4").exists() and not (tmp_path / "jobs").exists()


def test_unreachable_hub_says_what_to_download(tmp_path):
    env = _offline_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    run = subprocess.run(CLI + _no_models_args("generate", tmp_path), env=env, capture_output=True, text=True,
                         timeout=300)
    _assert_one_line_what_to_download(run, "the hub is unreachable: ")


def _start_and_stop(argv: list[str], ready: str, log_path: Path, env: dict) -> str:
    """Start a server, wait for its ready line, stop it with SIGTERM; returns everything it printed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(CLI + argv, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            deadline = time.monotonic() + START_S
            while ready not in log_path.read_text():
                if proc.poll() is not None:
                    pytest.fail(f"{argv[0]} exited with {proc.returncode}:\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{argv[0]} did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log_path.read_text()


@pytest.mark.parametrize("command", ["ui", "serve"])
def test_server_start_prints_no_library_warnings(command, tmp_path, cache):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    port = str(_free_port())
    if command == "ui":
        argv = ["ui", "--preset", "tiny", "--port", port, "--output-dir", str(tmp_path / "outputs")]
        ready = "Running on local URL"
    else:
        argv = ["serve", "--preset", "tiny", "--port", port, "--data-dir", str(tmp_path / "jobs")]
        ready = "Application startup complete"
    text = _start_and_stop(argv, ready, tmp_path / "server.log", env)
    assert ready in text
    assert not _warning_lines(text), text
