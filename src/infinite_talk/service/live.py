"""Live output of a job while it runs: one playable segment and one preview picture per finished chunk.

After chunk k the worker writes `<job>/live/<k>.mp4`, a self-contained fragmented mp4 (media/mp4.py
`write_segment`) of that chunk's frames with the soundtrack's span of those frames, and `<job>/live/<k>.json` (its
frame count and the byte length of its init section), then `<job>/live/<k>.png` (the chunk's last frame). A segment
counts once its `.json` exists (both are renamed into place), so readers never see half a segment. `playlist` turns
the segments into an HLS playlist (version 7, fMP4): each segment is its own init section (`EXT-X-MAP` with a byte
range) plus its fragments (`EXT-X-BYTERANGE`), and its timestamps start at 0, hence `EXT-X-DISCONTINUITY` between
segments. A resumed job finds the segments of its earlier chunks in place. Live output is a convenience: a segment
that cannot be written is logged and skipped, the job goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..media.audio import load_audio_original, scan_audio
from ..media.mp4 import soundtrack_rate, write_segment
from ..options import GenerateOptions
from ..sampling.windows import FPS

log = logging.getLogger(__name__)
LIVE_DIR = "live"


def live_folder(job_folder: Path) -> Path:
    return job_folder / LIVE_DIR


def segments(job_folder: Path) -> list[dict]:
    """The finished segments in order: {"index", "frames", "init_bytes", "size", "path", "preview"} (a gap ends the
    list: segments are written in chunk order)."""
    folder = live_folder(job_folder)
    out = []
    k = 0
    while True:
        meta, path = folder / f"{k:05d}.json", folder / f"{k:05d}.mp4"
        try:
            info = json.loads(meta.read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return out
        preview = folder / f"{k:05d}.png"
        out.append({"index": k, "frames": int(info["frames"]), "init_bytes": int(info["init_bytes"]), "size": size,
                    "audio": bool(info.get("audio")), "path": path,
                    "preview": preview if preview.is_file() else None})
        k += 1


def segment(job_folder: Path, n: int) -> Path | None:
    """Segment `n`'s file once it is complete, else None."""
    folder = live_folder(job_folder)
    path = folder / f"{n:05d}.mp4"
    return path if (folder / f"{n:05d}.json").is_file() and path.is_file() else None


def playlist(job_folder: Path, ended: bool, chunk_frames: int) -> str:
    """The HLS playlist of the finished segments; `#EXT-X-ENDLIST` once the job has `ended`. `chunk_frames`: the
    longest a chunk can be (the target duration must not change while the playlist grows)."""
    found = segments(job_folder)
    longest = max([chunk_frames, *(s["frames"] for s in found)]) / FPS
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{max(1, math.ceil(longest))}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for s in found:
        k = s["index"]
        if k:
            lines.append("#EXT-X-DISCONTINUITY")
        lines += [f'#EXT-X-MAP:URI="live/{k}",BYTERANGE="{s["init_bytes"]}@0"',
                  f"#EXTINF:{s['frames'] / FPS:.3f},",
                  f"#EXT-X-BYTERANGE:{s['size'] - s['init_bytes']}@{s['init_bytes']}",
                  f"live/{k}"]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def init_bytes(path: Path) -> int:
    """Length of the init section (the top-level boxes before the first `moof`) of a fragmented mp4."""
    offset = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                raise ValueError(f"{path.name}: no fragment found")
            size, kind = struct.unpack(">I4s", header)
            if kind == b"moof":
                return offset
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
            if size < 8:
                raise ValueError(f"{path.name}: malformed box {kind!r}")
            offset += size
            f.seek(offset)


class LiveWriter:
    """Writes a running job's live segments and previews (`on_chunk(k, frames, frames_before)`)."""

    def __init__(self, job_folder: Path, request: GenerateOptions):
        self.folder = live_folder(job_folder)
        self.request = request
        self._soundtrack: tuple[np.ndarray, int] | None | bool = False  # False: not read yet

    def soundtrack(self) -> tuple[np.ndarray, int] | None:
        """Speaker 1's audio at the rate the mp4 muxes it (what the final video carries for one speaker); two
        speakers' segments are silent (their mixed soundtrack is built inside the run)."""
        if self._soundtrack is False:
            self._soundtrack = None
            if not self.request.audio2:
                rate = soundtrack_rate(scan_audio(self.request.audio).rate)
                self._soundtrack = load_audio_original(self.request.audio, rate)
        return self._soundtrack

    def on_chunk(self, k: int, frames: np.ndarray, frames_before: int) -> None:
        try:
            self._write(k, frames, frames_before)
        except Exception as err:  # live playback is a convenience: the job goes on without this segment
            log.warning("live segment %d of %s not written: %s", k, self.folder.parent.name, err)

    def _write(self, k: int, frames: np.ndarray, frames_before: int) -> None:
        from PIL import Image

        self.folder.mkdir(mode=0o700, exist_ok=True)
        audio = None
        track = self.soundtrack()
        if track is not None:
            samples, rate = track
            start = int(round(frames_before * rate / FPS))
            end = min(samples.shape[1], int(round((frames_before + len(frames)) * rate / FPS)))
            if end > start:
                audio = (np.ascontiguousarray(samples[:, start:end]), rate)
        path = write_segment(self.folder / f"{k:05d}.mp4", frames, fps=FPS, audio=audio)
        picture = self.folder / f".{k:05d}.png.part"
        Image.fromarray(np.asarray(frames[-1])).save(picture, format="PNG")
        os.replace(picture, self.folder / f"{k:05d}.png")
        meta = self.folder / f".{k:05d}.json.part"
        meta.write_text(json.dumps({"frames": len(frames), "init_bytes": init_bytes(path), "audio": audio is not None}))
        os.replace(meta, self.folder / f"{k:05d}.json")
