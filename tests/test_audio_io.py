"""Audio decoding (PyAV) and loudness normalisation: formats, durations, refusals."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pyloudnorm
import pytest

from infinite_talk.errors import InputError
from infinite_talk.media.audio import load_audio, load_audio_original, loudness_normalize

EXAMPLES = Path(__file__).parent / "data" / "examples"


def write_media(path: Path, codec: str, rate: int, seconds: float, layout: str = "mono", signal=None,
                video: bool = False) -> Path:
    """A sine (or `signal`) encoded with PyAV; optionally muxed with a small black h264 video track."""
    channels = 2 if layout == "stereo" else 1
    n = int(round(rate * seconds))
    if signal is None:
        t = np.arange(n) / rate
        signal = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    data = np.tile(np.asarray(signal, np.float32)[None], (channels, 1))
    with av.open(str(path), "w") as container:
        if video:
            vstream = container.add_stream("libx264", rate=25)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        stream = container.add_stream(codec, rate=rate, layout=layout)
        block = 1024
        for start in range(0, n, block):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + block]), format="fltp",
                                               layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if video:
            for i in range(int(seconds * 25)):
                img = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
                img.pts = i
                for packet in vstream.encode(img):
                    container.mux(packet)
            for packet in vstream.encode(None):
                container.mux(packet)
    return path


def test_example_wav_duration_and_format():
    wave = load_audio(EXAMPLES / "speech_en.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - 10.12) < 0.01
    assert 0.01 < np.abs(wave).max() <= 1.0


@pytest.mark.parametrize(
    "name,codec,rate,layout",
    [
        ("tone.mp3", "libmp3lame", 44100, "stereo"),
        ("tone.flac", "flac", 22050, "mono"),
        ("tone.ogg", "libopus", 48000, "stereo"),
        ("tone.m4a", "aac", 44100, "stereo"),
        ("tone.wav", "pcm_s16le", 8000, "mono"),
    ],
)
def test_formats_decode_to_16k_mono_with_the_right_duration(tmp_path, name, codec, rate, layout):
    path = write_media(tmp_path / name, codec, rate, 1.5, layout)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # Lossy codecs add encoder priming / padding (AAC about 1-2 frames of 1024 samples): allow 0.1 s.
    assert abs(len(wave) / 16000 - 1.5) < 0.1, len(wave)
    # The 440 Hz sine at amplitude 0.3 survives decoding, resampling and down-mixing.
    mid = wave[4000:20000]
    assert 0.2 < np.sqrt(2 * np.mean(mid**2)) < 0.4
    spectrum = np.abs(np.fft.rfft(mid))
    assert abs(np.argmax(spectrum) * 16000 / len(mid) - 440) < 2


def test_video_audio_track(tmp_path):
    path = write_media(tmp_path / "talk.mp4", "aac", 44100, 2.0, "stereo", video=True)
    wave = load_audio(path)
    assert abs(len(wave) / 16000 - 2.0) < 0.1


def test_load_audio_original_keeps_channels_and_rate(tmp_path):
    path = write_media(tmp_path / "st.flac", "flac", 44100, 1.0, "stereo")
    data, rate = load_audio_original(path)
    assert rate == 44100 and data.dtype == np.float32 and data.shape == (2, 44100)
    t = np.arange(44100) / 44100
    np.testing.assert_allclose(data[0], 0.3 * np.sin(2 * np.pi * 440 * t), atol=1e-4)  # flac 16-bit: lossless


def test_missing_empty_corrupt_unsupported_files(tmp_path):
    with pytest.raises(InputError, match=r"nope\.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.wav: audio file is empty \(0 bytes\)"):
        load_audio(empty)
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=r"corrupt\.mp3: (cannot decode audio|has no audio stream|no audio samples|"
                                         r"audio stream is corrupt)"):
        load_audio(corrupt)
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(InputError, match=r"notes\.txt: cannot decode audio \(not a supported or a corrupt media"):
        load_audio(text)
    with pytest.raises(InputError, match=r"notes\.txt: cannot decode audio"):
        load_audio_original(text)
    with pytest.raises(InputError, match=r"is a folder"):
        load_audio(tmp_path)


def test_truncated_file(tmp_path):
    good = write_media(tmp_path / "tone.wav", "pcm_s16le", 16000, 1.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:40])  # header only, no samples
    with pytest.raises(InputError, match=r"cut\.wav: "):
        load_audio(cut)


def test_video_without_audio_track():
    with pytest.raises(InputError, match=r"reference_video\.mp4: has no audio stream"):
        load_audio(EXAMPLES / "reference_video.mp4")


def test_nan_samples_are_refused(tmp_path):
    sig = np.zeros(16000, np.float32)
    sig[100] = np.nan
    path = write_media(tmp_path / "nan.wav", "pcm_f32le", 16000, 1.0, signal=sig)
    with pytest.raises(InputError, match=r"nan\.wav: audio contains NaN or infinite samples"):
        load_audio(path)
    sig[100] = np.inf
    path = write_media(tmp_path / "inf.wav", "pcm_f32le", 16000, 1.0, signal=sig)
    with pytest.raises(InputError, match=r"inf\.wav: audio contains NaN or infinite samples"):
        load_audio(path)


def test_shorter_than_one_video_frame(tmp_path):
    path = write_media(tmp_path / "blip.wav", "pcm_s16le", 16000, 0.02)
    with pytest.raises(InputError, match=r"blip\.wav: audio is too short \(20\.0 ms\); at least one video frame"):
        load_audio(path)
    ok = write_media(tmp_path / "frame.wav", "pcm_s16le", 16000, 0.04)
    assert len(load_audio(ok)) == 640


def test_loudness_normalize_reaches_target():
    wave = load_audio(EXAMPLES / "speech_en.wav")
    out = loudness_normalize(wave)
    assert out.dtype == np.float32 and out.shape == wave.shape
    meter = pyloudnorm.Meter(16000)
    assert abs(meter.integrated_loudness(out.astype(np.float64)) - (-23.0)) < 0.01
    gain = out[np.abs(wave) > 1e-3] / wave[np.abs(wave) > 1e-3]
    assert np.allclose(gain, gain[0], rtol=1e-5)  # one single gain
    out18 = loudness_normalize(wave, target=-18.0)
    np.testing.assert_allclose(out18, out * 10 ** (5 / 20), rtol=1e-5, atol=1e-7)


def test_loudness_normalize_skips_silence_and_short_clips():
    silence = np.zeros(32000, np.float32)
    np.testing.assert_array_equal(loudness_normalize(silence), silence)  # -inf LUFS: |L| > 100
    short = (0.1 * np.sin(np.arange(3200) / 5)).astype(np.float32)  # 0.2 s < one 400 ms block
    np.testing.assert_array_equal(loudness_normalize(short), short)
    with pytest.raises(InputError, match="NaN or infinite"):
        loudness_normalize(np.array([0.0, np.nan] * 8000, np.float32))
