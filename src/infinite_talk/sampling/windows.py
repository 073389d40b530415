"""Chunk bookkeeping of the streaming loop (docs/REFERENCE.md §3.3, §3.8).

Every chunk generates `frame_num` (81) frames; the first `motion_frames` (9) of chunk k ≥ 1 are context frames taken
from the end of chunk k−1, so each later chunk adds `stride` = 72 new frames. Chunk k covers the audio frames
`audio_start = 72k … audio_start+80` (25 fps video frames; one wav2vec row per video frame).

Reference rules reproduced here:

* the window of video frame f takes the embedding rows f−2 … f+2, each index clamped to the (padded) track;
* after chunk k−1 the loop looks at chunk k's `audio_end`; when `audio_end ≥ min(max_frames, len of person 1)` chunk
  k is the last one, and every person whose track has `len ≤ audio_end` gets its last `audio_end − len + 3` rows
  appended in reverse order (mirror padding);
* the output is chunk 0's 81 frames followed by frames 9…80 of every later chunk, cut to `max_frames`, and, when
  any track was padded, to the original length of the last person's track.

Ours (docs/REFERENCE.md §0): audio of ≤ 81 frames is accepted (D7) — one chunk whose windows are padded as a
last chunk, output trimmed to the audio length; `max_frames` defaults to no cap (D4); the keyframe of chunk k is
requested by time, `audio_start/25 s`, not by raw source-frame index (D13; `keyframe_time`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infinite_talk.errors import InputError, OptionError

FRAME_NUM = 81
MOTION_FRAMES = 9
FPS = 25
WINDOW_OFFSETS = (-2, -1, 0, 1, 2)


def _check_geometry(frame_num: int, motion_frames: int) -> None:
    if frame_num < 5 or (frame_num - 1) % 4:
        raise OptionError(f"option 'frame_num' must be 4n+1 and at least 5 (default 81), got {frame_num}",
                          option="frame_num", value=frame_num)
    if motion_frames < 1 or (motion_frames - 1) % 4 or motion_frames >= frame_num:
        raise OptionError(f"option 'motion_frames' must be 4k+1 and below frame_num (default 9), got {motion_frames}",
                          option="motion_frames", value=motion_frames)


def audio_window(embedding: torch.Tensor, audio_start: int, frame_num: int = FRAME_NUM) -> torch.Tensor:
    """Rows `clamp(audio_start + i + o, 0, len−1)` for i < frame_num, o in −2..+2 → [frame_num, 5, ...]."""
    if embedding.shape[0] < 1:
        raise InputError("the audio track is empty: give a speech file with at least one video frame (40 ms) of sound")
    centres = torch.arange(audio_start, audio_start + frame_num).unsqueeze(1)
    idx = (centres + torch.tensor(WINDOW_OFFSETS).unsqueeze(0)).clamp(0, embedding.shape[0] - 1)
    return embedding[idx]


def mirror_pad_rows(length: int, audio_end: int) -> int:
    """Rows the reference appends to a track of `length` rows for a last chunk ending at `audio_end` (0 = none)."""
    return audio_end - length + 3 if audio_end >= length else 0


def mirror_pad(embedding: torch.Tensor, audio_end: int) -> torch.Tensor:
    """Append the reversed last `audio_end − len + 3` rows when `len ≤ audio_end` (unchanged otherwise).

    When more rows are asked for than the track has, the whole track is appended reversed (the later windows then
    clamp to its last row), as the reference's slice does.
    """
    rows = mirror_pad_rows(embedding.shape[0], audio_end)
    if rows == 0:
        return embedding
    return torch.cat([embedding, torch.flip(embedding[-rows:], dims=[0])], dim=0)


def chunk_count(num_frames: int, frame_num: int = FRAME_NUM, motion_frames: int = MOTION_FRAMES) -> int:
    """Chunks needed for `num_frames` output frames: 1 up to frame_num, then one more per stride (72) started.

    81 → 1, 82 → 2, 153 → 2, 154 → 3, 1000 → 14.
    """
    _check_geometry(frame_num, motion_frames)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise InputError(f"need at least one video frame (40 ms) of audio, got {num_frames!r} frames")
    stride = frame_num - motion_frames
    return 1 + max(0, math.ceil((num_frames - frame_num) / stride))


@dataclass(frozen=True)
class ChunkPlan:
    """Where every chunk sits on the audio timeline and which frames end up in the output."""

    audio_lens: tuple[int, ...]  # per person, rows (= 25 fps frames) before any padding
    max_frames: int | None
    frame_num: int
    motion_frames: int
    audio_starts: tuple[int, ...]  # per chunk
    pad_rows: tuple[int, ...]  # per person, mirror rows appended for the last chunk
    num_frames: int  # output frames after trimming

    @property
    def num_chunks(self) -> int:
        return len(self.audio_starts)

    @property
    def stride(self) -> int:
        return self.frame_num - self.motion_frames

    @property
    def frames_before_trim(self) -> int:
        return self.frame_num + self.stride * (self.num_chunks - 1)

    @property
    def duration_s(self) -> float:
        return self.num_frames / FPS

    def is_last(self, k: int) -> bool:
        return k == self.num_chunks - 1

    def audio_end(self, k: int) -> int:
        return self.audio_starts[k] + self.frame_num

    def motion_frames_for(self, k: int) -> int:
        """Pixel frames VAE-encoded as context for chunk k: the keyframe alone for chunk 0, then 9."""
        return 1 if k == 0 else self.motion_frames

    def keyframe_index(self, k: int) -> int:
        """The output-timeline (25 fps) frame whose source frame conditions chunk k (= audio_start)."""
        return self.audio_starts[k]

    def keyframe_time(self, k: int) -> float:
        """Seconds into the source video of chunk k's keyframe (the product picks the source frame by time)."""
        return self.audio_starts[k] / FPS

    def new_frames(self, k: int) -> slice:
        """The frames of chunk k's 81 decoded frames that go to the output (before the final trim)."""
        return slice(0, self.frame_num) if k == 0 else slice(self.motion_frames, self.frame_num)

    def chunk_output_frames(self, k: int) -> int:
        """Frames chunk k contributes to the trimmed output."""
        before = 0 if k == 0 else self.frame_num + self.stride * (k - 1)
        size = self.frame_num if k == 0 else self.stride
        return max(0, min(size, self.num_frames - before))

    def output_frame_source(self) -> torch.Tensor:
        """[num_frames, 2] int64: (chunk index, frame index inside that chunk's decoded frames)."""
        f = torch.arange(self.num_frames)
        later = f >= self.frame_num
        chunk = torch.where(later, 1 + (f - self.frame_num).div(self.stride, rounding_mode="floor"), 0)
        inner = torch.where(later, self.motion_frames + (f - self.frame_num) % self.stride, f)
        return torch.stack([chunk, inner], dim=1)

    def window(self, k: int, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stacked per-person audio windows of chunk k → [H, frame_num, 5, ...]."""
        if len(embeddings) != len(self.audio_lens):
            raise ValueError(f"plan has {len(self.audio_lens)} audio tracks, got {len(embeddings)}")
        out = []
        for p, emb in enumerate(embeddings):
            if emb.shape[0] != self.audio_lens[p]:
                raise ValueError(f"track {p + 1} has {emb.shape[0]} rows, the plan was made for {self.audio_lens[p]}")
            if self.is_last(k) and self.pad_rows[p]:
                emb = mirror_pad(emb, self.audio_end(k))
            out.append(audio_window(emb, self.audio_starts[k], self.frame_num))
        return torch.stack(out, dim=0)

    def as_dict(self) -> dict:
        return {
            "chunks": self.num_chunks,
            "frames": self.num_frames,
            "duration_s": round(self.duration_s, 3),
            "frames_generated": self.frames_before_trim,
            "max_frames": self.max_frames,
            "audio_frames": list(self.audio_lens),
            "mirror_padded_rows": list(self.pad_rows),
        }


def plan_chunks(audio_lens: int | Sequence[int], max_frames: int | None = None, frame_num: int = FRAME_NUM,
                motion_frames: int = MOTION_FRAMES) -> ChunkPlan:
    """Chunk plan for audio tracks of `audio_lens` rows (25 fps frames), optionally capped at `max_frames`.

    The last chunk is the first whose `audio_end ≥ min(max_frames, audio_lens[0])` (person 1's length, as the
    reference decides; the product feeds equal-length tracks).
    """
    _check_geometry(frame_num, motion_frames)
    lens = (audio_lens,) if isinstance(audio_lens, int) else tuple(audio_lens)
    if not lens:
        raise InputError("no audio track given: pass one speech file per person")
    for p, n in enumerate(lens):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"audio track {p + 1} is shorter than one video frame (40 ms): give longer speech")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise OptionError(f"option 'max_frames' must be a whole number of at least 1 (or unset: no cap), "
                          f"got {max_frames!r}")
    limit = lens[0] if max_frames is None else min(max_frames, lens[0])
    stride = frame_num - motion_frames
    starts = [0]
    while starts[-1] + frame_num < limit:
        starts.append(starts[-1] + stride)
    last_end = starts[-1] + frame_num
    pads = tuple(mirror_pad_rows(n, last_end) for n in lens)
    total = frame_num + stride * (len(starts) - 1)
    num_frames = total if max_frames is None else min(total, max_frames)
    if any(pads):
        num_frames = min(num_frames, lens[-1])  # reference: trim to the last loaded person's original length
    return ChunkPlan(lens, max_frames, frame_num, motion_frames, tuple(starts), pads, num_frames)
