"""Audio input: decode any audio file (or a video's audio track) to 16 kHz mono float32, loudness-normalise.

Decoding uses PyAV (bundled FFmpeg) with `av.AudioResampler`; loudness follows the reference `loudness_norm`
(pyloudnorm BS.1770 integrated loudness, one gain to -23 LUFS, skipped when |L| > 100). Every unusable input is
an `InputError` naming the file and saying what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

SAMPLE_RATE = 16000
VIDEO_FPS = 25
MIN_SAMPLES = SAMPLE_RATE // VIDEO_FPS  # one video frame of audio (640 samples = 40 ms)
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


def _decode(path: Path, rate_out: int | None) -> tuple[list[np.ndarray], int, int]:
    """Decoded frames as float32 [channels, n] arrays (resampled to `rate_out` if given), plus (rate, channels)."""
    import av

    container = _open(path)
    chunks: list[np.ndarray] = []
    try:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate or 0
        channels = stream.codec_context.channels or 0
        if rate <= 0 or channels <= 0:
            raise InputError(f"{path}: audio stream has no sample rate / channel layout; {_FIX}")
        if rate_out is not None:
            rate = rate_out
        # Channels are kept (callers average them, like librosa's mono=True; FFmpeg's down-mix would not).
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: audio stream is corrupt or cannot be decoded ({err}); {_FIX}") from err
    finally:
        container.close()
    channels = chunks[0].shape[0] if chunks else max(channels, 1)
    return chunks, rate, channels


def _check_samples(path: Path, data: np.ndarray, rate: int) -> None:
    n = data.shape[-1]
    if n == 0:
        raise InputError(f"{path}: no audio samples could be decoded (empty or corrupt audio stream); {_FIX}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: audio contains NaN or infinite samples; re-export the audio as a normal wav file")
    if n * SAMPLE_RATE < MIN_SAMPLES * rate:
        raise InputError(
            f"{path}: audio is too short ({n / rate * 1000:.1f} ms); at least one video frame "
            f"(1/{VIDEO_FPS} s = 40 ms) of audio is needed"
        )


def load_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz (channels averaged) of an audio file or a video's audio track."""
    path = Path(path)
    chunks, _, channels = _decode(path, SAMPLE_RATE)
    data = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    wave = data.astype(np.float32, copy=False).mean(axis=0, dtype=np.float32)
    _check_samples(path, wave, SAMPLE_RATE)
    return np.ascontiguousarray(wave)


def load_audio_original(path: str | Path) -> tuple[np.ndarray, int]:
    """The user's audio as decoded, not resampled: (float32 [channels, n], sample_rate), for muxing."""
    path = Path(path)
    chunks, rate, channels = _decode(path, None)
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False) if chunks else np.zeros((channels, 0), np.float32)
    _check_samples(path, data, rate)
    return np.ascontiguousarray(data), int(rate)


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
