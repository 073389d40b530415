"""The request check: every input and the output of a run, checked before any model weight is read.

Shared by the CLI (`generate`, before loading), the web UI (before a run is queued), the job service (the upload
checks call `check_reference` / `check_audio`) and `InfiniteTalkPipeline.generate` itself. It reads what a run will
read, in bounded memory: the reference picture (at most `frames.MAX_PIXELS`) or a video's header and first frame,
every audio file streamed frame by frame (`media.audio.scan_audio`: channels, rate, length, corruption), the boxes
against the reference, and the output: its folder writable (a probe file is created and removed) and the free disk
against an estimate of what the run writes. Every refusal is an `InputError` naming the file and the fix (a
`StorageError` when the output's storage cannot take the run now: a service may retry those).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, StorageError
from ..options import GenerateOptions
from ..sampling.windows import FPS
from .audio import SAMPLE_RATE, AudioInfo, scan_audio
from .frames import FrameSource, bucket_for, check_boxes

# Output size estimate: H.264 at the default crf 18 stays well under 0.5 bit per pixel for talking heads; AAC under
# 256 kbit/s; plus a fixed margin for the sidecar and the container.
VIDEO_BITS_PER_PIXEL = 0.5
AUDIO_BYTES_PER_S = 32_000
MARGIN_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ReferenceInfo:
    path: Path
    is_video: bool
    width: int  # as shown (EXIF orientation applied)
    height: int
    fps: float | None = None
    frames: int = 1


@dataclass(frozen=True)
class CheckedRequest:
    reference: ReferenceInfo
    audio: list[AudioInfo]
    out: Path
    frames: int  # video frames the run will write (estimate from the audio length and max_seconds)
    output_bytes: int  # estimated bytes the run writes (mp4, plus raw checkpoint frames when checkpointing)
    free_bytes: int
    notes: list[str] = field(default_factory=list)
    request: GenerateOptions | None = None  # what was checked (a caller may hand the result on instead of re-checking)
    checkpoint: bool = False


def check_reference(path: str | Path) -> ReferenceInfo:
    """A picture decoded (and converted as the run will), or a video's header and first frame."""
    path = Path(path)
    _readable(path, "reference")
    source = FrameSource(path)
    try:
        first = source.first_frame()
    finally:
        source.close()
    return ReferenceInfo(path, source.is_video, first.size[0], first.size[1], source.fps, source.num_frames)


def check_audio(path: str | Path, max_seconds: float | None = None) -> AudioInfo:
    """The whole audio stream decoded in bounded memory (`scan_audio`)."""
    path = Path(path)
    _readable(path, "audio")
    return scan_audio(path, max_seconds)


def _readable(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file; check the {what} path")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file; give the {what} file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err}); check the file's permissions") from None


def planned_frames(request: GenerateOptions, audio: list[AudioInfo]) -> int:
    """Video frames of the run: speech length (both speakers in 'add' mode, the longer in 'para'), capped by
    max_seconds."""
    seconds = [a.samples / a.rate for a in audio]
    total = sum(seconds) if len(seconds) == 2 and request.audio_mode == "add" else max(seconds)
    frames = math.ceil(total * SAMPLE_RATE / (SAMPLE_RATE // FPS))
    if request.max_seconds is not None:
        frames = min(frames, max(1, int(round(request.max_seconds * FPS))))
    return max(frames, 1)


def estimate_output_bytes(frames: int, height: int, width: int, checkpoint: bool = False) -> int:
    """Bytes a run of `frames` frames at height×width writes: the mp4 (see VIDEO_BITS_PER_PIXEL), plus every frame
    raw when it is checkpointed (the job service keeps each chunk's frames until the job ends)."""
    video = frames * height * width * VIDEO_BITS_PER_PIXEL / 8
    raw = frames * height * width * 3 if checkpoint else 0
    return int(video + frames / FPS * AUDIO_BYTES_PER_S + raw + MARGIN_BYTES)


def _existing_folder(folder: Path) -> Path:
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    return folder


def check_output(out: str | None, inputs: list[str], needed_bytes: int = 0) -> tuple[Path, int]:
    """The output path: an .mp4 that is no input, whose folder (or the nearest existing folder above it, where it
    will be created) takes a probe file and has `needed_bytes` free. Returns (path, free bytes)."""
    if not out:
        raise InputError("no output path: pass --out FILE.mp4")
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise InputError(f"{path}: the output must be an .mp4 file")
    sidecar = path.with_suffix(".json")
    for target in (path, sidecar):
        if target.is_dir():
            raise InputError(f"{target}: is a folder; choose an output file name ending in .mp4")
    resolved = path.resolve()
    for given in inputs:
        if given and Path(given).resolve() in (resolved, sidecar.resolve()):
            raise InputError(f"{path}: the output would overwrite the input {given}; choose another output path")
    folder = _existing_folder(path.parent)
    if not folder.is_dir():
        raise InputError(f"{path}: {folder} is not a folder; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".infinite-talk-probe-", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise StorageError(f"{path}: cannot write the output: a test file cannot be written in {folder} "
                         f"({err.strerror or err}); choose a folder you can write to", err.errno) from None
    for target in (path, sidecar):  # existing files are replaced: they must be writable (opened, not changed)
        if target.exists():
            try:
                with open(target, "ab"):
                    pass
            except OSError as err:
                raise InputError(f"{path}: cannot write the output: {target} exists and cannot be replaced "
                                 f"({err.strerror or err}); choose another output path") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise StorageError(f"{path}: the run writes about {needed_bytes / 2**20:,.0f} MiB but {folder} has "
                         f"{free / 2**20:,.0f} MiB free; free some space, choose another folder, or shorten the run "
                         "(max_seconds)", errno.ENOSPC)
    return path, free


def check_request(request: GenerateOptions, checkpoint: bool = False,
                  max_audio_seconds: float | None = None) -> CheckedRequest:
    """Everything a run reads and writes, before any weight is read (module doc). `checkpoint`: the run keeps raw
    frames for resuming (job service), counted in the disk estimate."""
    request.validate()
    if bool(request.image) == bool(request.video):
        raise InputError("give exactly one reference: --image PATH (image-to-video) or --video PATH (dubbing)")
    if not request.audio:
        raise InputError("no speech audio given: pass --audio PATH (wav/mp3/flac/m4a/ogg or a video)")
    if not request.out:
        raise InputError("no output path: pass --out FILE.mp4")
    reference = check_reference(request.image or request.video)
    if request.image and reference.is_video:
        raise InputError(f"{request.image}: is a video; pass it as --video for dubbing")
    paths = [request.audio] + ([request.audio2] if request.audio2 else [])
    audio = [check_audio(p, max_audio_seconds) for p in paths]
    check_boxes(request.bbox, len(audio), reference.height, reference.width)
    frames = planned_frames(request, audio)
    height, width = bucket_for(reference.height, reference.width, request.size)
    needed = estimate_output_bytes(frames, height, width, checkpoint)
    out, free = check_output(request.out, [request.image or request.video, *paths], needed)
    notes = [f"{a.path}: {a.channels} audio channels are averaged to mono for the model and the soundtrack"
             for a in audio if a.channels > 2]
    return CheckedRequest(reference, audio, out, frames, needed, free, notes, request, checkpoint)
