"""Service test support: waiting for a `serve` process (single-process and torchrun tests), a process that holds
the job database's write lock."""

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


# Run as `python -c LOCK_DATABASE DB_PATH`: takes the database's write lock, prints "held", keeps it until a line
# arrives on stdin (another process holding the lock, as an operator's sqlite3 shell or a backup tool would).
LOCK_DATABASE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("UPDATE jobs SET seq = seq")
print("held", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""
