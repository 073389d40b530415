"""MP4 output (H.264 yuv420p + AAC) and probing, via PyAV (docs/REFERENCE.md §3.9 with D18 replaced).

`write_mp4` takes uint8 frames [T,H,W,3] or an iterator of such chunks, so a long video can be written chunk by chunk
without holding it; the soundtrack (any sample rate, 1–2 channels) is cut to the video duration T/fps and
interleaved as the frames arrive.

Encoding is deterministic: the same frames (in any chunking) give the same bytes on any machine: x264 runs with a
fixed thread count (its default is derived from the CPU count, and the thread count shapes the bitstream), and the
container and encoders are bitexact (no library version strings, no wall-clock time).

While it is written the mp4 is fragmented (an empty `moov`, then a `moof`+`mdat` fragment about every
`FRAGMENT_S` of media), so a player can open it while it grows and a killed run leaves a readable file; `close()`
then rewrites it (stream copy, no re-encoding) as a regular mp4 with one index, which replaces the growing file
atomically. Fragment cuts follow the media time, not the chunking, so the bytes stay the same for any chunking.
`write_segment` writes one self-contained fragmented mp4 (init + fragments) per finished chunk for live playback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from infinite_talk.errors import InputError, OptionError

# sample rates the AAC encoder takes; a soundtrack at another rate is resampled to `soundtrack_rate(rate)`
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
X264_THREADS = 4
FRAGMENT_S = 0.5  # media seconds per fragment of a growing mp4
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3,T,H,W] or [1,3,T,H,W] in [−1,1] → uint8 [T,H,W,3] = round((clamp(x,−1,1)+1)/2·255), rounded once."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a batch of 1, got {tuple(video.shape)}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3,T,H,W], got {tuple(video.shape)}")
    x = (video.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    return torch.round(x).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def soundtrack_rate(rate: int) -> int:
    """The rate the soundtrack is muxed at: the file's own when AAC takes it, else the next higher AAC rate (48 kHz
    above 96 kHz)."""
    if rate in AAC_RATES:
        return rate
    return next((r for r in AAC_RATES if r >= rate), 48000) if rate <= AAC_RATES[-1] else 48000


def _as_frames(chunk) -> np.ndarray:
    arr = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {arr.dtype} {tuple(arr.shape)}")
    return arr


class Mp4Writer:
    """Incremental writer: `append(frames)` any number of times, then `close()` (or use as a context manager).

    `keep_fragmented`: the closed file stays fragmented (live segments, which Media Source Extensions need so)."""

    def __init__(self, path: str | Path, fps: int = 25, audio: tuple[np.ndarray | torch.Tensor, int] | None = None,
                 crf: int = 18, preset: str = "veryfast", keep_fragmented: bool = False):
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise OptionError(f"option 'crf' must be a whole number 0–51 (lower = better; default 18), got {crf!r}")
        if preset not in PRESETS:
            raise OptionError(f"option 'preset' must be one of {', '.join(PRESETS)}, got {preset!r}")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
            raise OptionError(f"option 'fps' must be a whole number of at least 1, got {fps!r}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"{self.path}: the folder {self.path.parent} does not exist; create it or choose "
                             "another output path")
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self.keep_fragmented = keep_fragmented
        self.frames_written = 0
        self._audio = None
        if audio is not None:
            samples, rate = audio
            samples = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
            samples = samples.astype(np.float32, copy=False)
            if samples.ndim == 1:
                samples = samples[None]
            if samples.ndim != 2 or samples.shape[0] not in (1, 2):
                raise InputError(f"{self.path}: the soundtrack must be mono or stereo samples [channels, n], got "
                                 f"{samples.shape} (media.audio.load_audio_original mixes any file down to 1 or 2)")
            if isinstance(rate, bool) or not isinstance(rate, int) or rate not in AAC_RATES:
                raise InputError(f"{self.path}: the soundtrack's sample rate must be one AAC takes "
                                 f"({', '.join(map(str, AAC_RATES))} Hz), got {rate!r}; resample it to "
                                 "media.mp4.soundtrack_rate(rate)")
            self._audio = (np.ascontiguousarray(samples), rate)
        self._container = None
        self._vstream = None
        self._astream = None
        self._audio_pos = 0  # samples handed to the encoder

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise InputError(f"{self.path}: frames are {width}×{height}; H.264 yuv420p needs even width and height")
        try:
            self._container = av.open(str(self.path), mode="w", format="mp4", options={
                "fflags": "+bitexact", "movflags": "empty_moov+default_base_moof+delay_moov", "flush_packets": "1",
                "frag_duration": str(int(FRAGMENT_S * 1e6))})
        except (av.error.FFmpegError, OSError) as err:
            raise InputError(f"{self.path}: cannot create the output file ({err}); check the path and "
                             "permissions") from None
        v = self._container.add_stream("libx264", rate=self.fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.time_base = Fraction(1, self.fps)
        v.options = {"crf": str(self.crf), "preset": self.preset, "threads": str(X264_THREADS), "flags": "+bitexact"}
        self._vstream = v
        if self._audio is not None:
            samples, rate = self._audio
            a = self._container.add_stream("aac", rate=rate)
            a.layout = "mono" if samples.shape[0] == 1 else "stereo"
            a.time_base = Fraction(1, rate)
            a.options = {"flags": "+bitexact"}
            self._astream = a

    def append(self, frames) -> None:
        arr = _as_frames(frames)
        if self._container is None:
            self._open(arr.shape[1], arr.shape[2])
        elif (arr.shape[1], arr.shape[2]) != (self._vstream.height, self._vstream.width):
            raise ValueError(f"frame size changed from {self._vstream.width}×{self._vstream.height} "
                             f"to {arr.shape[2]}×{arr.shape[1]}")
        for frame in arr:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = self.frames_written
            self._container.mux(self._vstream.encode(vf))
            self.frames_written += 1
        self._write_audio_until(self.frames_written)

    def _write_audio_until(self, num_frames: int, final: bool = False) -> None:
        if self._astream is None:
            return
        samples, rate = self._audio
        end = min(samples.shape[1], int(round(num_frames * rate / self.fps)))
        if end > self._audio_pos:
            block = samples[:, self._audio_pos:end]
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=self._astream.layout)
            af.sample_rate = rate
            af.pts = self._audio_pos
            self._container.mux(self._astream.encode(af))
            self._audio_pos = end
        if final:
            self._container.mux(self._astream.encode(None))

    def close(self) -> None:
        if self._container is None:
            raise InputError(f"{self.path}: no frames were written; the video would be empty")
        self._container.mux(self._vstream.encode(None))
        self._write_audio_until(self.frames_written, final=True)
        self._container.close()
        self._container = None
        if not self.keep_fragmented:
            _rewrite_regular(self.path)

    def abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: str | Path, frames: np.ndarray | torch.Tensor | Iterable, fps: int = 25,
              audio: tuple[np.ndarray | torch.Tensor, int] | None = None, crf: int = 18,
              preset: str = "veryfast") -> Path:
    """Write uint8 frames [T,H,W,3] (or an iterator of such chunks) as H.264 + AAC; audio cut to T/fps seconds."""
    writer = Mp4Writer(path, fps=fps, audio=audio, crf=crf, preset=preset)
    chunks: Iterator = iter([frames]) if isinstance(frames, (np.ndarray, torch.Tensor)) else iter(frames)
    with writer:
        for chunk in chunks:
            writer.append(chunk)
    return writer.path


def _rewrite_regular(path: Path) -> None:
    """The fragmented mp4 at `path` as a regular one (packets copied as they are), replacing it atomically; a
    reader that opened the growing file keeps reading it."""
    tmp = path.with_name(f".{path.name}.regular")
    try:
        with av.open(str(path)) as src, av.open(str(tmp), mode="w", format="mp4",
                                                  options={"fflags": "+bitexact"}) as dst:
            kept = [s for s in src.streams if s.type in ("video", "audio")]
            copies = {s.index: dst.add_stream_from_template(s) for s in kept}
            for packet in src.demux(*kept):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = copies[packet.stream.index]
                dst.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_segment(path: str | Path, frames, fps: int = 25,
                  audio: tuple[np.ndarray | torch.Tensor, int] | None = None) -> Path:
    """One self-contained fragmented mp4 (its own init section, then its fragments) of `frames` and the given audio
    span, written under a temporary name and renamed into place, so a reader never sees half a segment."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    writer = Mp4Writer(tmp, fps=fps, audio=audio, keep_fragmented=True)
    with writer:
        writer.append(frames)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    frames: int
    fps: float
    width: int
    height: int
    video_codec: str
    pix_fmt: str
    video_duration: float  # frames / fps
    audio_codec: str | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    audio_samples: int | None = None  # decoded samples (after the decoder's priming skip)
    audio_duration: float | None = None  # decoded samples / rate

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


def probe_media(path: str | Path) -> MediaInfo:
    """Decode a media file completely and report what is really in it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise InputError(f"{path}: not a readable media file ({err})") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path}: the file has no video stream")
        vs = container.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate
        fps = float(rate) if rate else math.nan
        width, height, vcodec = vs.codec_context.width, vs.codec_context.height, vs.codec_context.name
        pix_fmt = vs.codec_context.pix_fmt or ""
        frames = sum(1 for _ in container.decode(vs))
    info = dict(path=path, frames=frames, fps=fps, width=width, height=height, video_codec=vcodec, pix_fmt=pix_fmt,
                video_duration=frames / fps if fps else math.nan)
    with av.open(str(path)) as container:
        if container.streams.audio:
            st = container.streams.audio[0]
            n = sum(f.samples for f in container.decode(st))
            sr = st.codec_context.sample_rate
            info.update(audio_codec=st.codec_context.name, audio_sample_rate=sr,
                        audio_channels=st.codec_context.channels, audio_samples=n, audio_duration=n / sr)
    return MediaInfo(**info)
