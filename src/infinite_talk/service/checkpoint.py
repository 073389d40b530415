"""Per-chunk resume state of a job, in `<job>/checkpoint/`.

After chunk k: its uint8 output frames go to `frames_<k>.npy`, then `state.pt` (chunk index, seed, noise-generator
state, context frames, loop statistics) is replaced atomically. A server killed at any point therefore finds either
the previous or the new state, and every chunk file the state counts is complete. Frames are kept raw (not
re-encoded) so the final mp4, written from all of them, has the frames of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..pipeline import ChunkState

log = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JobCheckpoint:
    def __init__(self, job_folder: Path):
        self.folder = job_folder / "checkpoint"
        self.state_path = self.folder / "state.pt"

    def _frames_path(self, chunk: int) -> Path:
        return self.folder / f"frames_{chunk:05d}.npy"

    def save(self, state: ChunkState, frames: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        chunk_file = self._frames_path(state.next_chunk - 1)
        tmp = chunk_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(frames, dtype=np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, chunk_file)
        payload = {
            "next_chunk": state.next_chunk, "num_chunks": state.num_chunks, "seed": state.seed,
            "frames_written": state.frames_written, "generator_state": state.generator_state.clone(),
            "context_frames": state.context_frames.detach().cpu().clone(), "stats": state.stats,
        }
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.folder)

    def load(self) -> ChunkState | None:
        """The last saved state with its earlier frames, or None (nothing finished yet, or unusable leftovers)."""
        if not self.state_path.is_file():
            return None
        try:
            data = torch.load(self.state_path, map_location="cpu", weights_only=True)
            files = [self._frames_path(k) for k in range(data["next_chunk"])]
            counted = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
        except Exception as err:  # a checkpoint we cannot read is a run we cannot continue: start over
            log.warning("checkpoint in %s unusable (%s); the job starts over", self.folder, err)
            return None
        if counted != data["frames_written"]:
            log.warning("checkpoint in %s holds %d frames, its state counts %d; the job starts over", self.folder,
                        counted, data["frames_written"])
            return None
        return ChunkState(data["next_chunk"], data["num_chunks"], data["seed"], data["frames_written"],
                          data["generator_state"], data["context_frames"], data["stats"],
                          earlier_frames=_read_frames(files))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_frames(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:  # one chunk in memory at a time
        yield np.load(f)
