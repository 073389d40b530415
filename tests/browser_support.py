"""What the browser tests share: Debian's chromium driven by Playwright, a UI server process started for a test,
and pages in their own browser contexts. In CI (env CI set) a missing chromium or Playwright is a failure; elsewhere
the test is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
SERVER_START_S = 180
LONG_S = 300  # loading/generating on a busy 2-core CI machine


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test (.ci/system-deps installs chromium)")
    pytest.skip(reason)


def playwright_api():
    """Playwright's sync API, once chromium and Playwright are known to be there."""
    if not Path(CHROMIUM).is_file():
        unavailable("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    return sync_api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(folder: Path, command: list[str]):
    """Start a UI server process (`command` after the Python interpreter) and wait until it answers."""
    port = free_port()
    env = {**os.environ, "INFINITE_TALK_CACHE": str(folder / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(folder / "gradio"), "HF_HUB_OFFLINE": "1"}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, *[str(port) if c == "PORT" else c for c in command]],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the UI server exited with {proc.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the UI server did not answer within {SERVER_START_S} s:\n"
                            f"{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield {"url": url, "log": folder / "server.log", "outputs": folder / "outputs"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def open_page(browser, url: str):
    """A page in its own browser context: its own Gradio session, as a second person would have."""
    page = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#load-btn")
    return page
