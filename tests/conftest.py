"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent / "data" / "examples"

# One CPU thread per test process unless the caller chose otherwise. The tests run many small tensor operations, where
# a second OpenMP thread gains little, and on a machine shared with other jobs the threads of every operation wait for
# each other. Set before torch is imported (nothing imports it earlier), so it holds here and in every subprocess the
# tests start (torchrun jobs, servers), which therefore compute exactly like the in-process references.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh tiny-preset cache folder ($INFINITE_TALK_CACHE) for one test module, restored afterwards."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("INFINITE_TALK_CACHE")
    os.environ["INFINITE_TALK_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("INFINITE_TALK_CACHE", None)
    else:
        os.environ["INFINITE_TALK_CACHE"] = old


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory):
    """Half a second of the example speech as a wav file."""
    import soundfile as sf

    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    sf.write(path, data[: rate // 2], rate)
    return path


@pytest.fixture(scope="module")
def sync_api():
    """Playwright's sync API for the browser tests (tests/browser_support.py: a failure in CI when missing)."""
    from browser_support import playwright_api

    return playwright_api()


@pytest.fixture
def browser(sync_api):
    """Debian's chromium, headless, closed after the test."""
    from browser_support import CHROMIUM, CHROMIUM_ARGS

    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()
