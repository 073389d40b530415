"""Shared fixtures."""

from __future__ import annotations

import os

import pytest


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
