"""Audio of any channel count (issue 15): 8/16/64-channel WAV, FLAC and Opus decode (streamed, channels averaged)
through the loader, the job service's upload check and `generate`; more than 64 channels are refused with the
reason; a 30-minute 7-channel file is validated in bounded memory. FLAC itself stores at most 8 channels, so FLAC is
tried with 8; Opus (libopus, mapping family 255) and WAV with 8, 16 and 64."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from infinite_talk.cli import main as cli_main
from infinite_talk.errors import InputError
from infinite_talk.media.audio import MAX_CHANNELS, load_audio, load_audio_original, scan_audio
from infinite_talk.media.mp4 import AAC_RATES, Mp4Writer, probe_media, soundtrack_rate

EXAMPLES = Path(__file__).parent / "data" / "examples"
CASES = [("wav", 8), ("wav", 16), ("wav", 64), ("flac", 8), ("opus", 8), ("opus", 16), ("opus", 64)]


def channel_signal(channels: int, n: int, rate: int) -> np.ndarray:
    """[n, channels]: channel c is a sine at 200 + 10·c Hz, amplitude 0.2 (the average is a known waveform)."""
    t = np.arange(n) / rate
    return np.stack([0.2 * np.sin(2 * np.pi * (200 + 10 * c) * t) for c in range(channels)], axis=1).astype(np.float32)


def write_multichannel(path: Path, kind: str, channels: int, seconds: float = 0.5) -> Path:
    if kind in ("wav", "flac"):
        rate = 16000
        sf.write(path, channel_signal(channels, int(rate * seconds), rate), rate, subtype="PCM_16")
        return path
    rate, block = 48000, 960
    data = channel_signal(channels, int(rate * seconds), rate)
    layout = "7.1" if channels == 8 else f"{channels} channels"
    options = {} if channels <= 8 else {"mapping_family": "255"}
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=rate, layout=layout, options=options)
        for start in range(0, len(data), block):
            chunk = np.ascontiguousarray(data[start:start + block]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multichannel")
    return {(kind, ch): write_multichannel(folder / f"{ch}ch.{kind}", kind, ch) for kind, ch in CASES}


@pytest.mark.parametrize("kind,channels", CASES)
def test_any_channel_count_decodes_to_the_channel_average(files, kind, channels):
    path = files[kind, channels]
    info = scan_audio(path)
    assert info.channels == channels and abs(info.seconds - 0.5) < 0.03
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 8000) < 400
    expected = channel_signal(channels, 8000, 16000).mean(axis=1)
    if kind != "opus":  # lossless at 16 kHz: the average itself (16-bit quantisation only)
        np.testing.assert_allclose(wave, expected, atol=2e-4)
    else:  # lossy: the same waveform, roughly
        n = min(len(wave), len(expected)) - 400
        assert np.corrcoef(wave[400:n], expected[400:n])[0, 1] > 0.9
    soundtrack, rate = load_audio_original(path)
    assert soundtrack.shape[0] == 1 and rate == info.rate  # more than 2 channels: mono, as the model hears it


def test_stereo_stays_stereo_and_over_64_channels_is_refused(tmp_path):
    stereo = tmp_path / "st.wav"
    sf.write(stereo, channel_signal(2, 4000, 16000), 16000)
    data, rate = load_audio_original(stereo)
    assert data.shape == (2, 4000) and rate == 16000
    many = tmp_path / "65ch.wav"
    sf.write(many, np.zeros((1600, MAX_CHANNELS + 1), np.float32), 16000)
    for read in (scan_audio, load_audio, load_audio_original):
        with pytest.raises(InputError, match=r"65ch\.wav: the audio has 65 channels; at most 64 are supported"):
            read(many)


def test_soundtracks_are_muxed_at_a_rate_aac_takes(tmp_path):
    assert [soundtrack_rate(r) for r in (6000, 16000, 37800, 44100, 96000, 192000)] == [
        8000, 16000, 44100, 44100, 96000, 48000]
    assert all(soundtrack_rate(r) == r for r in AAC_RATES)
    odd = tmp_path / "odd.wav"
    sf.write(odd, channel_signal(1, 6000, 6000), 6000)
    data, rate = load_audio_original(odd, soundtrack_rate(6000))
    assert rate == 8000 and abs(data.shape[1] - 8000) < 50
    with pytest.raises(InputError, match="the soundtrack's sample rate must be one AAC takes"):
        Mp4Writer(tmp_path / "x.mp4", audio=(data, 6000))


def test_upload_checks_accept_exactly_what_a_job_runs(files, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from infinite_talk.service.api import create_app
    from infinite_talk.service.store import JobStore
    from infinite_talk.service.uploads import Limits

    store = JobStore(tmp_path / "data", Limits(max_upload_bytes=16 * 2**20, max_queued=50))
    client = TestClient(create_app(store), base_url="http://127.0.0.1:8000")  # no token: loopback Host only
    many = tmp_path / "65ch.wav"
    sf.write(many, np.zeros((8000, 65), np.float32), 16000)
    portrait = (EXAMPLES / "portrait.png").read_bytes()
    for (kind, channels), path in [*files.items(), (("wav", 65), many)]:
        answer = client.post("/jobs", files={"reference": ("portrait.png", portrait),
                                             "audio": (path.name, path.read_bytes())})
        if channels <= MAX_CHANNELS:
            assert answer.status_code == 201, (kind, channels, answer.text)
            audio = answer.json()["inputs"]["audio"]
            assert audio["channels"] == channels and abs(audio["seconds"] - 0.5) < 0.03
        else:
            assert answer.status_code == 422 and "65 channels; at most 64" in answer.json()["error"]
        assert client.get("/health").status_code == 200


LONG_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from infinite_talk.media.audio import load_audio
    from infinite_talk.service.uploads import Limits, check_audio

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def peak_growth(run):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = rss("VmRSS:")
        result = run()
        return rss("VmHWM:") - before, result

    check_audio(Path(sys.argv[2]), "warm-up", Limits())  # codecs and modules loaded before the baseline
    growth, info = peak_growth(lambda: check_audio(Path(sys.argv[1]), "long.flac", Limits()))
    # the same measurement sees the model's own 16 kHz mono track (115 MB of float32): it can see memory
    control, wave = peak_growth(lambda: load_audio(Path(sys.argv[1])))
    print(json.dumps({"growth": growth, "control": control, "control_bytes": wave.nbytes,
                      "seconds": info["seconds"], "channels": info["channels"]}))
""")


def test_a_30_minute_7_channel_file_is_validated_in_bounded_memory(tmp_path):
    rate, block, layout = 16000, 4608, "7 channels"
    path = tmp_path / "long.flac"
    silence = np.zeros((1, block * 7), np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate, layout=layout)
        total = 30 * 60 * rate
        for start in range(0, total, block):
            frame = av.AudioFrame.from_ndarray(silence[:, :min(block, total - start) * 7], format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    short = write_multichannel(tmp_path / "short.flac", "flac", 7)
    done = subprocess.run([sys.executable, "-c", LONG_SCRIPT, str(path), str(short)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    print(f"30-minute 7-channel FLAC ({path.stat().st_size} bytes): peak RSS growth of the upload check "
          f"{result['growth'] / 2**20:.1f} MiB (loading the 16 kHz mono track: {result['control'] / 2**20:.1f} MiB)")
    assert result["seconds"] == 1800.0 and result["channels"] == 7
    assert result["growth"] <= 200 * 2**20  # the old loader held every channel in float: +1.8 GiB
    assert result["control"] >= result["control_bytes"] > 100 * 2**20


@pytest.mark.parametrize("kind,channels", CASES)
def test_generate_runs_multichannel_speech_with_a_mono_soundtrack(cache, files, tmp_path, kind, channels, capsys):
    out = tmp_path / "o.mp4"
    code = cli_main(["generate", "--preset", "tiny", "--image", str(EXAMPLES / "portrait.png"),
                     "--audio", str(files[kind, channels]), "--steps", "1", "--frame-num", "9", "--motion-frames",
                     "1", "--text-scale", "1", "--audio-scale", "1", "--seed", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"note: {files[kind, channels]}: {channels} audio channels are averaged to mono" in err
    info = probe_media(out)
    assert info.frames == 12 and info.audio_channels == 1  # 0.5 s of speech: 12 whole frames at 25 fps
    assert info.audio_sample_rate == (48000 if kind == "opus" else 16000)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["effective"]["soundtrack"]["source_channels"] == channels
    assert sidecar["inputs"]["audio_files"][0]["channels"] == channels
