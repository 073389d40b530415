"""Run by tests/test_parallel_service.py, one copy per process (under torchrun, or started as torchrun would);
not a test module itself.

    parallel_serve.py ROOT serve --preset tiny ...

runs `infinite-talk serve ...` from a folder of its own (ROOT/rank-N: a file written by a process other than rank 0
shows there), with its output in ROOT/rank-N.log, its process id in ROOT/rank-N.pid and its exit code in
ROOT/rank-N.exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    root, rank = Path(sys.argv[1]), os.environ["RANK"]
    log = os.open(root / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    (root / f"rank-{rank}.pid").write_text(str(os.getpid()))
    folder = root / f"rank-{rank}"
    folder.mkdir()
    os.chdir(folder)
    from infinite_talk.cli import main as cli_main

    code = cli_main(sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    (root / f"rank-{rank}.exit").write_text(str(code))
    if rank != "0":  # as `infinite-talk` (cli.run) ends these processes: no teardown
        from infinite_talk.parallel.launch import exit_process

        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
