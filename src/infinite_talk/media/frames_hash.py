"""`frames_sha256`: one SHA-256 over the generated uint8 frames, in order (the CLI's sidecar and service jobs).

The hash is of the frames the sampler produced (uint8 [t,H,W,3], row-major bytes), not of the mp4: it proves that a
resumed or repeated run made the same pictures whatever the encoder did with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch


class FramesHash:
    def __init__(self):
        self._digest = hashlib.sha256()

    def update(self, frames) -> None:
        """Add a chunk of uint8 frames [t,H,W,3] (numpy or torch)."""
        arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.dtype != np.uint8:
            raise ValueError(f"frames_sha256 is taken over uint8 frames, got {arr.dtype}")
        self._digest.update(np.ascontiguousarray(arr).tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def hashed(frames: Iterable, digest: FramesHash) -> Iterator:
    """`frames` unchanged, each chunk added to `digest` as it passes (earlier chunks of a resumed run)."""
    for chunk in frames:
        digest.update(chunk)
        yield chunk
