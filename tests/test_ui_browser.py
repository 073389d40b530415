"""The web UI in a real browser (Debian's chromium driven by Playwright) on the tiny preset.

The test starts `infinite-talk ui --preset tiny` itself, then, as a person would: generates before loading models
(a message, no crash), picks a load option this machine cannot run (refused in the page, never run as something
else), loads models, uploads a portrait and 3 s of speech, generates, and checks that the page's <video> plays a
file of the right duration (and that the served mp4 really holds 75 frames plus the audio).

In CI (env CI set) a missing chromium or Playwright is a failure; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from urllib.parse import urljoin

import pytest
import soundfile as sf

from browser_support import LONG_S, open_page, serving
from infinite_talk.media.mp4 import probe_media
from infinite_talk.options import LoadOptions
from infinite_talk.plan.probe import probe
from infinite_talk.ui import controls as C

EXAMPLES = Path(__file__).parent / "data" / "examples"
@pytest.fixture(scope="module")
def server(tmp_path_factory, sync_api):
    folder = tmp_path_factory.mktemp("ui")
    with serving(folder, ["-m", "infinite_talk.cli", "ui", "--preset", "tiny", "--host", "127.0.0.1", "--port",
                               "PORT", "--output-dir", str(folder / "outputs")]) as served:
        yield served


@pytest.fixture
def page(server, browser):
    return open_page(browser, server["url"])


def _speech(folder: Path, seconds: int) -> Path:
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    path = folder / f"speech_{seconds}s.wav"
    sf.write(path, data[: seconds * rate], rate)
    return path


def _fill_request(page, expect, audio: Path, steps: int) -> None:
    page.locator("#ref-image input[type=file]").set_input_files(str(EXAMPLES / "portrait.png"))
    page.locator("#audio1 input[type=file]").set_input_files(str(audio))
    # The upload's plan update first (the audio length is known), then the steps: one change at a time, so a slow
    # upload cannot land after the steps and be the one the test reads.
    expect(page.locator("#request-plan")).to_contain_text("model calls: ", timeout=30_000)
    box = page.locator("#steps input")
    box.fill(str(steps))
    box.press("Tab")
    expect(page.locator("#request-plan")).to_contain_text(f"steps that run: {steps}", timeout=30_000)


def _video_duration(page) -> float:
    page.wait_for_function("() => { const v = document.querySelector('#result-video video');"
                           " return v && v.readyState >= 1 && isFinite(v.duration); }", timeout=60_000)
    return page.evaluate("document.querySelector('#result-video video').duration")


def _pick(page, name: str, value: str) -> str:
    """Choose `value` in the dropdown of load option `name`; returns the label the page shows for it."""
    page.click(f"#{name.replace('_', '-')} input")
    option = page.locator(f'li[role=option][aria-label="{value}"], li[role=option][aria-label^="{value} "]')
    label = option.get_attribute("aria-label")
    option.click()
    return label


@contextlib.contextmanager
def _explained(server, **pages):
    """On failure, add what each page showed and the server log's tail to the error."""
    try:
        yield
    except Exception as err:
        shown = []
        for name, page in pages.items():
            for box in ("#load-status", "#load-check", "#audio1-check", "#ref-check", "#run-status", "#run-progress"):
                try:
                    shown.append(f"{name} {box}: {page.inner_text(box, timeout=2000)!r}")
                except Exception:  # the page itself may be gone
                    pass
        tail = server["log"].read_text()[-3000:]
        raise AssertionError(f"{err}\n--- page state:\n" + "\n".join(shown) + f"\n--- server log:\n{tail}") from err


def _first_refused_choice() -> tuple[str, str]:
    statuses = C.choice_status(LoadOptions(preset="tiny"), probe())
    refused = [(name, s.value) for name, rows in statuses.items() for s in rows if not s.available]
    preferred = [r for r in refused if r == ("attention", "flash_attn_3")]
    if not (preferred or refused):
        pytest.fail("every load choice runs on this machine; no refusal to test")
    return (preferred or refused)[0]


def test_ui_in_a_real_browser(server, page, sync_api, tmp_path):
    expect = sync_api.expect
    with _explained(server, page=page):
        # 1. Generate before loading models: a message in the page, no traceback, the server keeps serving.
        page.click("#run-btn")
        expect(page.locator("#run-status")).to_contain_text(
            "Not started. No models are loaded: press 'Load models' in the model panel first")
        assert "Traceback" not in page.inner_text("body")
        expect(page.get_by_text("Use via API")).to_be_visible()

        # 2. A choice this machine cannot run is listed with its reason and cannot be picked: it goes back to the
        #    last value that runs, at once, with the reason.
        name, value = _first_refused_choice()
        default = C.field_default(LoadOptions, name)
        statuses = C.choice_status(LoadOptions(preset="tiny"), probe())
        default_label = next(s.label for s in statuses[name] if s.value == default)
        label = _pick(page, name, value)
        assert label.startswith(f"{value} — unavailable: ")
        check = page.locator("#load-check")
        expect(check).to_contain_text(f"{C.LABELS[name]}: {value} is unavailable here (")
        expect(check).to_contain_text(f"set back to {default}")
        expect(page.locator(f"#{name.replace('_', '-')} input")).to_have_value(default_label)

        # Every refusal at once, each on its own line: torch.compile on a CPU and sequence parallel in one process.
        page.get_by_text("More load options").click()
        page.locator("#compile input").check()
        ulysses = page.locator("#ulysses input, #ulysses textarea").first
        ulysses.click()
        ulysses.press_sequentially("2")  # typed: Gradio's input event (fill() sets the value without it)
        ulysses.press("Tab")
        expect(check.locator("li")).to_have_count(2)
        expect(check.locator("li").nth(0)).to_contain_text("compile=on: needs a CUDA GPU")
        expect(check.locator("li").nth(1)).to_contain_text("ulysses=2: sequence parallel needs several processes")
        page.click("#load-btn")
        expect(page.locator("#load-status")).to_contain_text("Not loaded. Refused:")
        page.click("#run-btn")
        expect(page.locator("#run-status")).to_contain_text("No models are loaded")
        page.reload()  # a fresh form (the defaults)
        page.wait_for_selector("#load-btn")

        # 3. The load plan shows requested → effective, then the models load.
        expect(check).to_contain_text(f"{name}: {default} → ")
        page.click("#load-btn")
        expect(page.locator("#load-status")).to_contain_text("Models loaded (tiny geometry on cpu",
                                                             timeout=LONG_S * 1000)
        expect(page.locator("#load-btn")).to_be_enabled()
        plan = page.input_value("#load-plan textarea")
        assert f"{name}: {default} → " in plan and "attention: auto → " in plan and "geometry: tiny" in plan

        # 4. Upload a portrait and 3 s of speech, 2 steps; the request plan follows the controls.
        _fill_request(page, expect, _speech(tmp_path, 3), steps=2)
        plan_box = page.locator("#request-plan")
        expect(plan_box).to_contain_text("chunks: 1 → 75 frames, 3.00 s of video")
        expect(plan_box).to_contain_text("model calls: 6 (1 chunks × 2 steps × 3 passes)")

        # 5. Generate: progress, a preview of the finished chunk, the video, the seed and the sidecar.
        page.click("#run-btn")
        status = page.locator("#run-status")
        expect(status).to_contain_text("Done: 75 frames, 3.00 s, seed ", timeout=LONG_S * 1000)
        expect(page.locator("#run-progress")).to_contain_text("finished: chunk 1/1 · step 2/2 · elapsed ")
        expect(page.locator("#run-progress")).not_to_contain_text("ETA")  # no stale estimate after the run
        bar = page.locator("#run-bar")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "2"
        expect(page.locator("#run-btn")).to_have_text("Generate")
        expect(page.locator("#run-btn")).to_be_enabled()
        seed = page.input_value("#seed-used textarea")
        assert re.fullmatch(r"\d+", seed) and f"seed {seed}," in status.inner_text()
        expect(page.locator("#previews img")).to_have_count(1)

        duration = _video_duration(page)
        assert abs(duration - 3.0) < 0.1, duration
        page.evaluate("document.querySelector('#result-video video').muted = true;"
                      "document.querySelector('#result-video video').play()")
        page.wait_for_function("() => document.querySelector('#result-video video').currentTime > 0.3",
                               timeout=30_000)
        assert page.evaluate("document.querySelector('#result-video video').error") is None

        served = page.request.get(page.evaluate("document.querySelector('#result-video video').currentSrc"))
        assert served.ok
        mp4 = tmp_path / "served.mp4"
        mp4.write_bytes(served.body())
        info = probe_media(mp4)
        assert (info.frames, info.fps, info.video_codec, info.audio_codec) == (75, 25.0, "h264", "aac")
        assert 3.0 - 1e-3 <= info.audio_duration <= 3.0 + 1024 / 16000 + 1e-3

        sidecar_link = page.locator("#sidecar a").first
        sidecar = json.loads(page.request.get(sidecar_link.get_attribute("href")).text())
        assert sidecar["status"] == "completed" and sidecar["seed"] == int(seed)
        assert sidecar["effective"]["steps"] == 2 and sidecar["effective"]["model_calls"] == 6
        assert "Traceback" not in page.inner_text("body")

        # 6. The run is listed among this server's results, with its video and sidecar.
        history = page.locator("#history")
        expect(history).to_contain_text("completed · portrait.png")
        expect(history.locator("a", has_text="video")).to_have_count(1)
        listed = history.locator("a", has_text="sidecar").first.get_attribute("href")
        assert page.request.get(urljoin(server["url"], listed)).json()["seed"] == int(seed)


def test_second_page_waits_with_its_position_and_cancel_keeps_the_finished_chunk(server, browser, sync_api,
                                                                                  tmp_path):
    expect = sync_api.expect
    first, second = open_page(browser, server["url"]), open_page(browser, server["url"])
    with _explained(server, first=first, second=second):
        first.click("#load-btn")
        expect(first.locator("#load-status")).to_contain_text("Models loaded", timeout=LONG_S * 1000)
        # 2 chunks of 200 steps: chunk 2 runs long enough to be cancelled once chunk 1's preview shows
        _fill_request(first, expect, _speech(tmp_path, 5), steps=200)
        expect(first.locator("#request-plan")).to_contain_text("chunks: 2 → 125 frames")
        _fill_request(second, expect, _speech(tmp_path, 3), steps=2)

        first.click("#run-btn")
        expect(first.locator("#run-btn")).to_be_disabled()  # busy while its job runs
        expect(first.locator("#run-btn")).to_have_text("Generating…")
        expect(first.locator("#run-progress")).to_contain_text("chunk 1/2", timeout=LONG_S * 1000)
        second.click("#run-btn")
        expect(second.locator("#run-status")).to_contain_text(
            "Waiting for the GPU: position 2 in the queue (1 job ahead; one runs at a time).")

        expect(first.locator("#previews img")).to_have_count(1, timeout=LONG_S * 1000)  # chunk 1 finished
        first.click("#cancel-btn")
        status = first.locator("#run-status")
        expect(status).to_contain_text("Cancelled. cancelled at chunk 2/2", timeout=LONG_S * 1000)
        expect(status).to_contain_text("the 81 finished frames are kept in ")
        expect(status).not_to_contain_text("Cancelling")  # the status line is replaced, not stacked
        expect(first.locator("#run-progress")).to_contain_text("cancelled: chunk 2/2")
        expect(first.locator("#run-progress")).not_to_contain_text("ETA")
        expect(first.locator("#run-btn")).to_be_enabled()
        assert abs(_video_duration(first) - 81 / 25) < 0.1

        expect(second.locator("#run-status")).to_contain_text("Done: 75 frames, 3.00 s", timeout=LONG_S * 1000)
        assert abs(_video_duration(second) - 3.0) < 0.1


def test_the_interface_as_a_tab_of_a_host_app(tmp_path, browser, sync_api):
    """`build_tab` inside a host's `gr.Tab`: the host's own tab keeps working and a video is made from ours."""
    expect = sync_api.expect
    script = Path(__file__).with_name("ui_host_app.py")
    with serving(tmp_path, [str(script), "PORT", str(tmp_path / "outputs")]) as host:
        page = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
        page.set_default_timeout(60_000)
        page.goto(host["url"])
        with _explained(host, page=page):
            page.locator("#host-say input, #host-say textarea").first.fill("hello")
            page.locator("#host-say input, #host-say textarea").first.press("Enter")
            expect(page.locator("#host-echo textarea, #host-echo input").first).to_have_value("HELLO")
            page.get_by_role("tab", name="Infinite Talk").click()
            expect(page.locator("#request-plan")).to_contain_text("steps that run: 40")  # the page-load plan
            page.click("#load-btn")
            expect(page.locator("#load-status")).to_contain_text("Models loaded (tiny geometry on cpu",
                                                                 timeout=LONG_S * 1000)
            _fill_request(page, expect, _speech(tmp_path, 1), steps=1)
            page.click("#run-btn")
            expect(page.locator("#run-status")).to_contain_text("Done: 25 frames, 1.00 s", timeout=LONG_S * 1000)
            assert abs(_video_duration(page) - 1.0) < 0.1
            assert list((tmp_path / "outputs").glob("*/talk.json"))


def test_gradio_client_loads_generates_and_downloads(server, tmp_path):
    """A script drives the running UI with the official client, keyword arguments only."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server["url"], download_files=str(tmp_path / "downloads"), verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert {"/load_models", "/plan", "/generate"} <= set(api["named_endpoints"])
    assert not api["unnamed_endpoints"]  # the page's own handlers are not part of the API
    params = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert all(p["parameter_has_default"] for p in params.values())
    assert params["size"]["python_type"]["type"] == "Literal['480', '720']"
    assert params["size"]["parameter_default"] == "480" and params["steps"]["parameter_default"] == 40

    status, plan = client.predict(api_name="/load_models")  # every option at its default: the tiny preset here
    assert status.startswith("Models loaded (tiny geometry on cpu") and "geometry: tiny" in plan
    with pytest.raises(AppError, match="no speech: upload speaker 1's audio"):
        client.predict(image=handle_file(str(EXAMPLES / "portrait.png")), api_name="/generate")

    speech = _speech(tmp_path, 1)
    plan = client.predict(image=handle_file(str(EXAMPLES / "portrait.png")), audio=handle_file(str(speech)),
                          steps=2, size="480", api_name="/plan")
    assert "steps that run: 2" in plan and "chunks: 1 → 25 frames" in plan
    video, sidecar_path, seed, status = client.predict(
        image=handle_file(str(EXAMPLES / "portrait.png")), audio=handle_file(str(speech)), steps=2, size="480",
        seed="7", api_name="/generate")
    assert status.startswith("Done: 25 frames, 1.00 s, seed 7,") and seed == "7"
    assert Path(video).is_relative_to(tmp_path / "downloads") and Path(video).suffix == ".mp4"
    info = probe_media(video)
    assert (info.frames, info.video_codec, info.audio_codec) == (25, "h264", "aac")
    sidecar = json.loads(Path(sidecar_path).read_text())
    assert sidecar["status"] == "completed" and sidecar["seed"] == 7 and sidecar["effective"]["steps"] == 2


def test_inputs_checked_on_upload_refusals_by_name_and_a_compact_page(server, page, sync_api, tmp_path):
    """Uploads are checked when they arrive (message under the box, the user's file name); a run refused before it
    starts writes nothing; out-of-range numbers and the refused fast mode are named on the page; examples fill
    the form; rarely changed fields are folded; audio boxes have no Share button."""
    expect = sync_api.expect
    with _explained(server, page=page):
        bad = tmp_path / "my notes.wav"
        bad.write_text("hello, this is not audio")
        page.locator("#audio1 input[type=file]").set_input_files(str(bad))
        check = page.locator("#audio1-check")
        expect(check).to_contain_text("Refused: my notes.wav: cannot decode audio")
        expect(check).not_to_contain_text("/gradio/")
        short = tmp_path / "short.wav"
        data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
        sf.write(short, data[: rate // 10], rate)
        page.locator("#audio2 input[type=file]").set_input_files(str(short))
        expect(page.locator("#audio2-check")).to_contain_text(
            "Refused: Speaker 2 audio (optional): short.wav is 0.10 s long; speech must be at least 0.5 s")
        fake = tmp_path / "face.png"
        fake.write_text("not a picture")
        page.locator("#ref-image input[type=file]").set_input_files(str(fake))
        expect(page.locator("#ref-check")).to_contain_text("Reference refused: face.png: not a readable image")
        assert "Error:" not in page.inner_text("#ref-check")

        before = set(server["outputs"].iterdir()) if server["outputs"].exists() else set()
        page.click("#run-btn")
        expect(page.locator("#run-status")).to_contain_text("Not started.")
        after = set(server["outputs"].iterdir()) if server["outputs"].exists() else set()
        assert after == before  # nothing written for a run that never started

        steps = page.locator("#steps input")
        steps.fill("5000")
        steps.press("Tab")
        expect(page.locator("#request-plan")).to_contain_text("Steps: 5000 is outside [1, 1000]")

        _pick(page, "mode", "fast")
        expect(page.locator("#load-check")).to_contain_text("Mode fast refused:")
        expect(page.locator("#load-check")).to_contain_text("'LoRA files'")
        expect(page.locator("#load-check")).not_to_contain_text("--lora")
        expect(page.locator("#mode input")).to_have_value("standard")
        assert page.input_value("#steps input") == "5000"  # a refused mode changes nothing

        page.locator("#examples").get_by_text("portrait + English speech").click()
        expect(page.locator("#ref-check")).to_contain_text("✓ portrait.png: ")
        expect(check).to_contain_text("✓ speech_en.wav: ")
        expect(page.locator("#audio1 button[aria-label*='Share' i], #audio1 button[title*='Share' i]")).to_have_count(0)
        expect(page.locator("#negative-prompt")).to_be_hidden()  # folded
        attention = page.locator("#attention input")
        assert attention.evaluate("e => e.scrollWidth <= e.clientWidth")  # "auto → sdpa-native" fits
