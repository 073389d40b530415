"""Waiting for a `serve` process in tests (shared by the single-process and the torchrun service tests)."""

from __future__ import annotations

import subprocess
import time


def wait_until_healthy(url: str, processes: list[subprocess.Popen], timeout: float) -> str | None:
    """None once `url`/health answers 200; else why not ("a process exited" / "timed out")."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return "a process exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return "timed out"
