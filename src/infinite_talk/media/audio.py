"""Audio input: decode any audio file (or a video's audio track) to 16 kHz mono float32, loudness-normalise.

Decoding uses PyAV (bundled FFmpeg) with `av.AudioResampler`, streamed frame by frame: channels are averaged as
each frame is decoded (a 64-channel file never sits in memory as float), at most `MAX_CHANNELS` channels. Loudness follows the reference `loudness_norm`
(pyloudnorm BS.1770 integrated loudness, one gain to -23 LUFS, skipped when |L| > 100). Every unusable input is
an `InputError` naming the file and saying what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

SAMPLE_RATE = 16000
VIDEO_FPS = 25
MIN_SAMPLES = SAMPLE_RATE // VIDEO_FPS  # one video frame of audio (640 samples = 40 ms)
MAX_CHANNELS = 64  # FFmpeg's resampler converts at most 64 channels
MAX_RATE = 768_000  # FFmpeg's own upper bound for audio sample rates
MAX_PREALLOCATED_S = 4 * 3600  # a header's duration is believed up to this many seconds when sizing the buffer
_FIX = "use a wav/mp3/flac/m4a/ogg file or a video with an audio track"


def _open(path: str | Path):
    import av

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: audio file not found; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an audio file; {_FIX}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: audio file is empty (0 bytes); {_FIX}")
    try:
        container = av.open(str(path))
    except Exception as err:  # av.error.InvalidDataError, FileNotFoundError, ...
        raise InputError(f"{path}: cannot decode audio (not a supported or a corrupt media file: {err}); {_FIX}") from err
    if not container.streams.audio:
        fmt = container.format.name
        video = [s for s in container.streams.video if s.codec_context.name not in ("ansi", "bintext", "xbin")]
        container.close()
        if fmt == "tty" or not video:
            raise InputError(f"{path}: cannot decode audio (not a supported or a corrupt media file: no audio stream, "
                             f"detected format {fmt!r}); {_FIX}")
        if fmt.endswith("_pipe"):
            raise InputError(f"{path}: is an image ({fmt}), not audio; {_FIX}")
        raise InputError(f"{path}: has no audio stream (a video without sound?); {_FIX}")
    return container


@dataclass(frozen=True)
class AudioInfo:
    """What a streamed pass over an audio file found (nothing of the samples is kept)."""

    path: Path
    codec: str
    rate: int  # the file's own sample rate
    channels: int  # the file's channels (the model hears their average; the soundtrack keeps 1 or 2)
    samples: int  # decoded samples per channel at `rate`

    @property
    def seconds(self) -> float:
        return self.samples / self.rate

    @property
    def soundtrack_channels(self) -> int:
        return self.channels if self.channels <= 2 else 1


def _stream_params(path: Path, container) -> tuple[object, int, int]:
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate or 0
    channels = stream.codec_context.channels or 0
    if rate <= 0 or channels <= 0:
        raise InputError(f"{path}: audio stream has no sample rate / channel layout; {_FIX}")
    if channels > MAX_CHANNELS:
        raise InputError(f"{path}: the audio has {channels} channels; at most {MAX_CHANNELS} are supported "
                         "(FFmpeg's resampler limit); export a mono or stereo mix of the speech")
    if rate > MAX_RATE:
        raise InputError(f"{path}: the audio's sample rate is {rate} Hz, above the {MAX_RATE} Hz this tool "
                         "decodes; resample it (e.g. to 48000 Hz)")
    return stream, rate, channels


def _blocks(path: Path, rate_out: int | None, keep_stereo: bool) -> Iterator[np.ndarray]:
    """Decoded audio as float32 [c, n] blocks, frame by frame: c = 1 (channels averaged, like librosa's
    mono=True) or, with `keep_stereo`, 2 for a stereo file. Resampled to `rate_out` if given.

    Each decoded frame goes through FFmpeg's resampler to *packed* float with its own layout (no down-mix matrix:
    FFmpeg's would weight channels unequally), then is averaged here. PyAV mis-counts the planes of planar frames of
    8 or more channels (reading past the frame: a crash), so planar data is never read directly.
    """
    import av

    container = _open(path)
    try:
        stream, rate, channels = _stream_params(path, container)
        resampler = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate_out or rate)

        def convert(frames) -> Iterator[np.ndarray]:
            for out in frames:
                packed = out.to_ndarray().reshape(-1, channels)  # [n, channels]
                if keep_stereo and channels == 2:
                    yield np.ascontiguousarray(packed.T)
                elif channels == 1:
                    yield packed.reshape(1, -1)
                else:
                    yield packed.mean(axis=1, dtype=np.float32)[None]

        try:
            for frame in container.decode(stream):
                yield from convert(resampler.resample(frame))
            yield from convert(resampler.resample(None))
        except InputError:
            raise
        except Exception as err:  # av.error.*, a frame whose channel count changed mid-stream, ...
            raise InputError(f"{path}: audio stream is corrupt or cannot be decoded ({err}); {_FIX}") from err
    finally:
        container.close()


def _check_block(path: Path, block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        raise InputError(f"{path}: audio contains NaN or infinite samples; re-export the audio as a normal wav file")


def _check_length(path: Path, n: int, rate: int) -> None:
    if n == 0:
        raise InputError(f"{path}: no audio samples could be decoded (empty or corrupt audio stream); {_FIX}")
    if n * SAMPLE_RATE < MIN_SAMPLES * rate:
        raise InputError(
            f"{path}: audio is too short ({n / rate * 1000:.1f} ms); at least one video frame "
            f"(1/{VIDEO_FPS} s = 40 ms) of audio is needed"
        )


class _Track:
    """A growing float32 [c, n] buffer: filled block by block in place (no list of blocks joined at the end, which
    would hold the track twice)."""

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 1)
        self.data: np.ndarray | None = None
        self.n = 0

    def append(self, block: np.ndarray) -> None:
        need = self.n + block.shape[1]
        if self.data is None:
            self.data = np.empty((block.shape[0], max(self.capacity, need)), np.float32)
        elif need > self.data.shape[1]:
            grown = np.empty((self.data.shape[0], max(need, self.data.shape[1] * 3 // 2)), np.float32)
            grown[:, :self.n] = self.data[:, :self.n]
            self.data = grown
        self.data[:, self.n:need] = block
        self.n = need

    def result(self) -> np.ndarray:
        return np.zeros((1, 0), np.float32) if self.data is None else self.data[:, :self.n]


def _collect(path: Path, rate_out: int | None, keep_stereo: bool) -> tuple[np.ndarray, int]:
    """The whole track as one float32 [c, n] array (c = 1, or 2 for a kept stereo track), and its rate."""
    path = Path(path)
    with _open(path) as container:
        stream, rate, _ = _stream_params(path, container)
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
            container.duration / 1e6 if container.duration else 0.0)
    rate = rate_out or rate
    # sized from the header (pages are only used as they are filled; a false header just means regrowing)
    track = _Track(int(min(declared, MAX_PREALLOCATED_S) * rate) + rate)
    for block in _blocks(path, rate_out, keep_stereo):
        _check_block(path, block)
        track.append(block)
    data = track.result()
    _check_length(path, data.shape[1], rate)
    return data, rate


def scan_audio(path: str | Path, max_seconds: float | None = None) -> AudioInfo:
    """Decode the whole file in bounded memory (one frame at a time) and say what it holds: the checks of
    `load_audio` (decodable, finite, at least 40 ms, at most `MAX_CHANNELS`), without keeping the samples. Stops
    with an `InputError` as soon as more than `max_seconds` are decoded."""
    path = Path(path)
    with _open(path) as container:
        stream, rate, channels = _stream_params(path, container)
        codec = stream.codec_context.name
    samples = 0
    for block in _blocks(path, None, keep_stereo=False):
        _check_block(path, block)
        samples += block.shape[1]
        if max_seconds is not None and samples > max_seconds * rate:
            raise InputError(f"{path}: more than {max_seconds:.0f} s of audio; at most {max_seconds:.0f} s are "
                             "accepted per job; cut the speech into shorter jobs")
    _check_length(path, samples, rate)
    return AudioInfo(path, codec, int(rate), int(channels), int(samples))


def load_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz (channels averaged) of an audio file or a video's audio track."""
    data, _ = _collect(Path(path), SAMPLE_RATE, keep_stereo=False)
    return np.ascontiguousarray(data[0])


def load_audio_original(path: str | Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """The user's audio for muxing: (float32 [channels, n], sample_rate) with 1 or 2 channels (a stereo file stays
    stereo, more channels are averaged to mono), at the file's own rate or resampled to `rate`."""
    data, rate_out = _collect(Path(path), rate, keep_stereo=True)
    return np.ascontiguousarray(data), int(rate_out)


def integrated_loudness(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """pyloudnorm BS.1770 integrated loudness in LUFS, or None when the clip is shorter than one 400 ms block."""
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    if wave.shape[0] < meter.block_size * sample_rate:
        return None
    return float(meter.integrated_loudness(wave))


def loudness_normalize(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, target: float = -23.0) -> np.ndarray:
    """Reference `loudness_norm`: one gain so the integrated loudness becomes `target` LUFS (float32 out).

    Unchanged when |loudness| > 100 (e.g. digital silence = -inf) and, unlike the reference (which crashes), when
    the clip is shorter than one 400 ms measurement block.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise InputError(f"loudness_normalize expects a mono waveform [n], got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise InputError("audio contains NaN or infinite samples; re-export the audio as a normal wav file")
    loudness = integrated_loudness(wave, sample_rate)
    if loudness is None or not np.isfinite(loudness) or abs(loudness) > 100:
        return wave.astype(np.float32, copy=True)
    gain = np.power(10.0, (target - loudness) / 20.0)
    return (wave.astype(np.float64) * gain).astype(np.float32)
