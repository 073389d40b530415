"""Uploads and job options: copied under names the server chooses, size-limited, validated by decoding.

Every refusal is an `UploadRefused` whose message names the upload as the client called it (never a server path)
and says what to send instead; `status` is the HTTP code the API answers with.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import InfiniteTalkError, InputError, OptionError
from ..media.audio import SAMPLE_RATE
from ..media.frames import MAX_PIXELS, MAX_SIDE
from ..options import GenerateOptions, field_kind, read

REFERENCE_FIX = "upload a PNG/JPEG/WebP picture or an MP4/MOV/MKV/WebM video"
AUDIO_FIX = "upload speech as wav/mp3/flac/m4a/ogg (or a video with sound)"
SERVER_FIELDS = ("image", "video", "audio", "audio2", "out")  # set by the server from the uploads, never by clients
TEXT_CODECS = {"ansi", "bintext", "xbin", "idf", "tty"}  # FFmpeg shows text files as "video"; never a reference
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}  # the only decoders
# a text file is no picture, video or sound; refusing text also keeps FFmpeg from following playlists (HLS, ffconcat,
# SDP) that name other files or network addresses
TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}
VIDEO_SUFFIXES = {"mov": ".mov", "matroska": ".mkv", "avi": ".avi"}
LOSSLESS_EXACT_LENGTH = ("flac", "pcm_")  # codecs whose container states the exact sample count


class UploadRefused(InputError):
    """An upload or option the service will not take; the message is the complete answer to the client."""

    status = 422


class TooLarge(UploadRefused):
    status = 413


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 512 * 2**20  # one request (all files together)
    max_audio_seconds: float = 1800.0  # speech per job (both speakers together)
    max_side: int = MAX_SIDE  # reference pixels per side
    max_pixels: int = MAX_PIXELS
    max_queued: int = 1000  # queued + running jobs


def display_name(name: str | None, fallback: str) -> str:
    """The client's file name, only for messages: base name, printable, short."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())[:120]
    return base or fallback


def copy_upload(src: BinaryIO, dest: Path, budget: int, label: str, limit: int) -> int:
    """Copy a stream into `dest` (a server-chosen path) refusing beyond `budget` bytes (what is left of the job's
    `limit`); returns the size."""
    size = 0
    with open(dest, "wb") as out:
        while block := src.read(1 << 20):
            size += len(block)
            if size > budget:
                raise TooLarge(f"{label}: the job's files are over this server's limit of {limit / 2**20:.0f} MiB "
                               "(--max-upload-mb); send shorter or smaller files")
            out.write(block)
    return size


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return bool(head) and sum(byte in TEXT_BYTES for byte in head) >= 0.95 * len(head)


def _relabel(err: InfiniteTalkError, path: Path, label: str) -> UploadRefused:
    return UploadRefused(str(err).replace(str(path), label))


# ----------------------------------------------------------------------------------------------------- reference

def _check_dimensions(label: str, w: int, h: int, limits: Limits, what: str) -> None:
    if w < 16 or h < 16:
        raise UploadRefused(f"{label}: the {what} is {w}×{h} pixels; send at least 16×16 pixels")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise UploadRefused(f"{label}: the {what} is {w}×{h} pixels, larger than this server accepts "
                            f"({limits.max_side} pixels per side, {limits.max_pixels / 1e6:.0f} megapixels); "
                            "downscale it first")


def _image_header(path: Path, label: str, limits: Limits) -> tuple[str, int, int] | None:
    """(format, width, height) read from the header only, or None when the content is not a picture."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked right below
            with Image.open(path, formats=list(IMAGE_SUFFIXES)) as image:
                width, height = image.size
                fmt = image.format or ""
    except Image.DecompressionBombError as err:  # PIL refuses such a header before any decoding
        raise UploadRefused(f"{label}: the image is larger than this server accepts ({limits.max_side} pixels per "
                            f"side, {limits.max_pixels / 1e6:.0f} megapixels; {err}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError):
        return None  # not a picture PIL may read: the video check decides
    _check_dimensions(label, width, height, limits, "image")
    return fmt, width, height


def _decoding(check):
    """Any other failure while decoding a client's file is that file's problem: a 422 naming it, never a 500."""
    @functools.wraps(check)
    def checked(path: Path, label: str, limits: Limits) -> dict:
        try:
            return check(path, label, limits)
        except InfiniteTalkError:
            raise
        except Exception as err:
            raise UploadRefused(f"{label}: cannot be decoded ({type(err).__name__}: {err}); "
                                f"{REFERENCE_FIX if check.__name__ == 'check_reference' else AUDIO_FIX}") from None
    return checked


@_decoding
def check_reference(path: Path, label: str, limits: Limits) -> dict:
    """Decide image or video by content, check the size from the header, then decode it. May rename `path`."""
    from ..media.frames import FrameSource, read_image

    if path.stat().st_size == 0:
        raise UploadRefused(f"{label}: the file is empty (0 bytes); {REFERENCE_FIX}")
    if _is_text(path):
        raise UploadRefused(f"{label}: not a picture or a video (the file is text); {REFERENCE_FIX}")
    header = _image_header(path, label, limits)
    if header is not None:
        fmt, width, height = header
        final = path.rename(path.with_suffix(IMAGE_SUFFIXES.get(fmt, ".image")))
        try:
            width, height = read_image(final).size  # as the job sees it: EXIF orientation applied
        except InputError as err:
            raise _relabel(err, final, label) from None
        return {"kind": "image", "file": final.name, "format": fmt, "width": width, "height": height}
    fmt, width, height = _video_header(path, label, limits)
    final = path.rename(path.with_suffix(VIDEO_SUFFIXES.get(fmt, ".video")))
    try:
        source = FrameSource(final)
        if not source.is_video:
            raise UploadRefused(f"{label}: not a picture or a video; {REFERENCE_FIX}")
        source.first_frame()
        source.close()
    except InputError as err:
        raise _relabel(err, final, label) from None
    return {"kind": "video", "file": final.name, "format": fmt, "width": width, "height": height,
            "fps": source.fps, "frames": source.num_frames}


def _video_header(path: Path, label: str, limits: Limits) -> tuple[str, int, int]:
    import av

    refuse = UploadRefused(f"{label}: not a picture or a video (the content is neither a readable image nor a "
                           f"video stream); {REFERENCE_FIX}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        raise refuse from None
    with container:
        fmt = container.format.name.split(",")[0]
        streams = [s for s in container.streams.video if s.codec_context.name not in TEXT_CODECS]
        if fmt == "tty" or not streams:
            raise refuse
        stream = streams[0]
        width, height = stream.codec_context.width, stream.codec_context.height
    _check_dimensions(label, width, height, limits, "video")
    return fmt, width, height


# --------------------------------------------------------------------------------------------------------- audio

def _wav_truncation(path: Path) -> str | None:
    """For a RIFF/RIFX WAVE file: why its sample data is shorter than its header says, else None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        order = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, length = struct.unpack(order + "4sI", f.read(8))
            if chunk_id == b"data":
                available = size - pos - 8
                if length not in (0, 0xFFFFFFFF) and length > available:  # 0 / ~0: a streaming writer's unknown size
                    return f"its header announces {length} bytes of samples but only {available} are there"
                return None
            pos += 8 + length + (length & 1)
    return None


def _scan_audio(path: Path, label: str, limit_s: float) -> float:
    """Seconds of audio, found by decoding (stops as soon as the limit is passed, whatever the header claims)."""
    import av

    def over(seconds: float) -> UploadRefused:
        return UploadRefused(f"{label}: {seconds:.1f} s of audio is over this server's limit of {limit_s:.0f} s per "
                             "job (--max-audio-seconds); cut the speech into shorter jobs")

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return 0.0  # load_audio gives the precise message
    with container:
        if not container.streams.audio:
            return 0.0
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or 0
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if declared is None and container.duration:
            declared = container.duration / 1e6
        if declared is not None and declared > limit_s:
            raise over(declared)
        samples = 0
        try:
            for frame in container.decode(stream):
                samples += frame.samples
                if rate and samples / rate > limit_s:
                    raise over(samples / rate)
        except (av.error.FFmpegError, ValueError) as err:
            raise UploadRefused(f"{label}: the audio stream is corrupt or cut off ({err}); {AUDIO_FIX}") from None
        codec = stream.codec_context.name
        seconds = samples / rate if rate else 0.0
        if declared is not None and codec.startswith(LOSSLESS_EXACT_LENGTH) and seconds + 0.05 < declared:
            raise UploadRefused(f"{label}: the file is truncated: its header announces {declared:.2f} s of audio, "
                                f"only {seconds:.2f} s could be decoded; {AUDIO_FIX}")
    return seconds


@_decoding
def check_audio(path: Path, label: str, limits: Limits) -> dict:
    """Decode the whole track in bounded memory (NaN, length, channels, corruption, truncation, duration limit):
    the request check a job runs (`media.request_check.check_audio`), so an upload passes exactly when the job can
    run it."""
    from ..media import request_check

    if path.stat().st_size == 0:
        raise UploadRefused(f"{label}: the file is empty (0 bytes); {AUDIO_FIX}")
    if _is_text(path):
        raise UploadRefused(f"{label}: cannot decode audio: the file is text, not sound; {AUDIO_FIX}")
    why = _wav_truncation(path)
    if why:
        raise UploadRefused(f"{label}: the wav file is truncated ({why}); send the complete file")
    _scan_audio(path, label, limits.max_audio_seconds)
    try:
        info = request_check.check_audio(path, limits.max_audio_seconds)
    except InputError as err:
        raise _relabel(err, path, label) from None
    samples_16k = int(round(info.samples * SAMPLE_RATE / info.rate))
    return {"file": path.name, "seconds": round(info.seconds, 3), "samples_16k": samples_16k,
            "channels": info.channels, "sample_rate": info.rate}


# ------------------------------------------------------------------------------------------------------- options

KIND_WORDS = {"str": "text", "int": "integer", "float": "number", "bool": "true/false",
              "boxes": "[[row_min, col_min, row_max, col_max], ...]", "lines": "list of text"}


def options_help() -> str:
    """The description of a job's `options` form field (the OpenAPI schema), from the options schema."""
    fields = []
    for f in dataclasses.fields(GenerateOptions):
        if f.name in SERVER_FIELDS:
            continue
        choices = [str(c) for c in f.metadata.get("choices") or () if c is not None]
        fields.append(f"{f.name} ({'|'.join(choices) or KIND_WORDS[field_kind(GenerateOptions, f.name)[0]]})")
    return (f'GenerateOptions as a JSON object, e.g. {{"steps": 8, "seed": 1}}; fields: {", ".join(fields)}; an '
            "absent or null field keeps its default (docs/OPTIONS.md gives values, ranges and defaults)")


def parse_options(text: str | bytes | None) -> GenerateOptions:
    """The `options` JSON of a job: GenerateOptions fields minus the paths, read by the schema (`options.read`:
    type, range and choice, the same refusals as the CLI and the UI); null means the default."""
    if text is None or (isinstance(text, str | bytes) and not text.strip()):
        data: object = {}
    else:
        def no_constant(name: str):
            raise ValueError(f"{name} is not a number JSON allows")

        try:
            data = json.loads(text, parse_constant=no_constant)
        except (ValueError, RecursionError) as err:
            raise UploadRefused(f"options: not valid JSON ({err}); send an object such as "
                                '{"steps": 8, "seed": 42}') from None
    if not isinstance(data, dict):
        raise UploadRefused('options: must be a JSON object such as {"steps": 8, "seed": 42}')
    named = [k for k in SERVER_FIELDS if k in data]
    if named:
        raise UploadRefused(f"options: {', '.join(named)} cannot be set: the reference and speech are uploaded as the "
                            "multipart files 'reference', 'audio' and 'audio2', and the server keeps the output")
    try:
        return read(GenerateOptions, data)
    except OptionError as err:  # the cause keeps the option and value it is about
        raise UploadRefused(f"options: {err}") from err


def copy_file(src: Path, dest: Path, budget: int, label: str, limit: int) -> int:
    """A local file (in-process callers such as the web UI) copied like an upload."""
    if not src.is_file():
        raise UploadRefused(f"{label}: no such file")
    with open(src, "rb") as f:
        return copy_upload(f, dest, budget, label, limit)
