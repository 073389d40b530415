"""Live playback (issue 18): the job service's HLS playlist grows by one segment per finished chunk and ends with
#EXT-X-ENDLIST; segments decode with PyAV to the chunk's frames (with the chunk's audio); token and 404 rules as for
the other routes. And the CLI's mp4 can be opened while it is written, and is a regular mp4 with audio at the end."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from infinite_talk.media.mp4 import Mp4Writer, probe_media  # noqa: E402
from infinite_talk.options import GenerateOptions, LoadOptions  # noqa: E402
from infinite_talk.pipeline import InfiniteTalkPipeline  # noqa: E402
from infinite_talk.service import live as live_module  # noqa: E402
from infinite_talk.service.api import create_app  # noqa: E402
from infinite_talk.service.store import JobStore  # noqa: E402
from infinite_talk.service.worker import Worker  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
TOKEN = "live-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHORT = dict(frame_num=21, motion_frames=5, steps=1, text_scale=1, audio_scale=1, seed=3)


@pytest.fixture(scope="module")
def pipeline(cache):
    pipe = InfiniteTalkPipeline()
    pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    return pipe


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    sf.write(path, data[: int(1.2 * rate)], rate)  # 30 frames: chunks of 21 and 9 new frames
    return path


def _segments(playlist: str) -> list[str]:
    return [line for line in playlist.splitlines() if line and not line.startswith("#")]


def test_playlist_grows_per_chunk_and_ends_and_segments_decode(pipeline, clip, tmp_path, monkeypatch):
    store = JobStore(tmp_path / "data")
    client = TestClient(create_app(store, TOKEN), headers=AUTH)
    job = store.submit(EXAMPLES / "portrait.png", clip, options=SHORT)
    url = f"/jobs/{job.id}/live.m3u8"
    queued = client.get(url)
    assert queued.status_code == 200 and queued.headers["content-type"] == "application/vnd.apple.mpegurl"
    assert _segments(queued.text) == [] and "#EXT-X-ENDLIST" not in queued.text
    seen = []
    original = live_module.LiveWriter.on_chunk

    def on_chunk(self, k, frames, frames_before):  # the playlist as a client sees it right after each chunk
        original(self, k, frames, frames_before)
        seen.append(client.get(url).text)

    monkeypatch.setattr(live_module.LiveWriter, "on_chunk", on_chunk)
    worker = Worker(store, pipeline, "worker-live", threading.Event())
    worker.process(store.claim_next("worker-live"))
    assert [_segments(text) for text in seen] == [["live/0"], ["live/0", "live/1"]]
    assert all("#EXT-X-ENDLIST" not in text for text in seen)
    final = client.get(url).text
    assert store.get(job.id).state == "completed" and final.rstrip().endswith("#EXT-X-ENDLIST")
    assert final.startswith("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:1\n")
    assert final.count("#EXT-X-DISCONTINUITY") == 1
    durations = [float(x) for x in re.findall(r"#EXTINF:([0-9.]+),", final)]
    assert durations == [21 / 25, 9 / 25]
    decoded = []
    for k, uri in enumerate(_segments(final)):
        response = client.get(f"/jobs/{job.id}/{uri}")
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        init, rest = re.findall(rf'#EXT-X-MAP:URI="{uri}",BYTERANGE="(\d+)@0"\n#EXTINF:[0-9.]+,\n'
                                rf"#EXT-X-BYTERANGE:(\d+)@\1\n{uri}\n", final)[0]
        assert int(init) + int(rest) == len(response.content)
        assert response.content[int(init) + 4:int(init) + 8] == b"moof"  # the byte range starts at a fragment
        path = tmp_path / f"segment{k}.mp4"
        path.write_bytes(response.content)
        info = probe_media(path)
        assert info.has_audio and abs(info.audio_duration - info.frames / 25) < 0.1
        with av.open(str(path)) as container:
            decoded += [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 30
    with av.open(str(store.folder(job.id) / "output.mp4")) as container:
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    # two encodes of the same frames: close, not equal (each segment starts with its own keyframe)
    assert np.abs(np.stack(decoded).astype(int) - full.astype(int)).mean() < 4
    assert (store.folder(job.id) / "live" / "00001.png").is_file()  # the preview of chunk 2


def test_live_routes_follow_the_token_and_answer_404(tmp_path, short_wav):
    store = JobStore(tmp_path / "data")
    job = store.submit(EXAMPLES / "portrait.png", short_wav, options={"steps": 1})
    anonymous = TestClient(create_app(store, TOKEN))
    for path in (f"/jobs/{job.id}/live.m3u8", f"/jobs/{job.id}/live/0"):
        response = anonymous.get(path)
        assert response.status_code == 401 and "token" in response.json()["error"]
    client = TestClient(create_app(store, TOKEN), headers=AUTH)
    missing = client.get(f"/jobs/{job.id}/live/0")
    assert missing.status_code == 404 and "no finished chunk 1 yet" in missing.json()["error"]
    unknown = "A" * 22
    for path in (f"/jobs/{unknown}/live.m3u8", f"/jobs/{unknown}/live/0", "/jobs/short/live.m3u8"):
        response = client.get(path)
        assert response.status_code == 404 and "no job" in response.json()["error"]
    assert client.get(f"/jobs/{job.id}/live/-1").status_code == 422
    store.cancel(job.id)
    ended = client.get(f"/jobs/{job.id}/live.m3u8").text
    assert _segments(ended) == [] and ended.rstrip().endswith("#EXT-X-ENDLIST")
    # without a token: loopback names only, as for the other routes
    open_client = TestClient(create_app(store), base_url="http://evil.example")
    assert open_client.get(f"/jobs/{job.id}/live.m3u8").status_code == 403


def test_the_cli_mp4_is_readable_while_it_grows_and_regular_with_audio_at_the_end(pipeline, clip, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "talk.mp4"
    growing = []
    original = Mp4Writer.append

    def append(self, frames):  # after each chunk's frames, open the file as a player would
        original(self, frames)
        if self.path == out:
            growing.append(probe_media(out))

    monkeypatch.setattr(Mp4Writer, "append", append)
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    sf.write(tmp_path / "two_s.wav", data[: 2 * rate], rate)  # 50 frames: chunks of 41 and 9 new frames
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(tmp_path / "two_s.wav"), out=str(out),
                              **{**SHORT, "frame_num": 41})
    result = pipeline.generate(request)
    # readable after chunk 1: what the encoder has handed over so far (its lookahead holds the last frames back)
    assert len(growing) == 2 and 0 < growing[0].frames < 41 and growing[0].has_audio
    info = probe_media(out)
    assert result.frames == info.frames == 50 and info.has_audio
    assert abs(info.audio_duration - 50 / 25) < 0.1
    data = out.read_bytes()
    assert b"moof" not in data and b"moov" in data  # the finished file is a regular (unfragmented) mp4
