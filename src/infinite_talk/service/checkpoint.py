"""Per-chunk resume state of a job, in `<job>/checkpoint/`.

After chunk k: its uint8 output frames go to `frames_<k>.npy`, then `state.pt` (chunk index, seed, noise-generator
state, context frames, loop statistics) is replaced atomically. A server killed at any point therefore finds either
the previous or the new state, and every chunk file the state counts is complete. Frames are kept raw (not
re-encoded) so the final mp4, written from all of them, has the frames of an uninterrupted run. Files are written
whole (serialised first) and private (0600); a failed write (disk full, read-only) raises the `OSError` and leaves
the previous state as it was. `clear` is resumable: a kill half-way leaves a name the next start removes.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..pipeline import ChunkState
from .store import CHECKPOINT_DIR, PRIVATE_DIR, PRIVATE_FILE, discard, storage_fault

log = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_whole(path: Path, data: bytes | memoryview) -> None:
    """`data` into `path` through a temporary file, synced, then renamed over it."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class JobCheckpoint:
    def __init__(self, job_folder: Path):
        self.folder = job_folder / CHECKPOINT_DIR
        self.state_path = self.folder / "state.pt"

    def _frames_path(self, chunk: int) -> Path:
        return self.folder / f"frames_{chunk:05d}.npy"

    def save(self, state: ChunkState, frames: np.ndarray) -> None:
        self.folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(frames, dtype=np.uint8))
        _write_whole(self._frames_path(state.next_chunk - 1), buffer.getbuffer())
        payload = {
            "next_chunk": state.next_chunk, "num_chunks": state.num_chunks, "seed": state.seed,
            "frames_written": state.frames_written, "generator_state": state.generator_state.clone(),
            "context_frames": state.context_frames.detach().cpu().clone(), "stats": state.stats,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        _write_whole(self.state_path, buffer.getbuffer())
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
            if storage_fault(err):  # unless the disk failed: then it is read again once storage is back
                raise
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
        discard(self.folder)


def _read_frames(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:  # one chunk in memory at a time
        yield np.load(f)
