"""Where the project keeps what it can rebuild: $INFINITE_TALK_CACHE, else ~/.cache/infinite_talk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("INFINITE_TALK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "infinite_talk")
    return Path(root)
