"""A job belongs to the server, not to the page (issues 18 and 20), in a real browser (Debian's chromium driven by
Playwright) on the tiny preset: a page starts a two-chunk run and reloads; the reloaded page shows the running job
(progress, the preview of the finished chunk) and the true model state, its live <video> plays the finished chunk
before the job ends, a second tab sees the same, and Cancel (not the reload) stops the run, keeping the finished
chunk, which the history then lists with its sidecar.

In CI (env CI set) a missing chromium or Playwright is a failure; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin

import pytest
import soundfile as sf

from browser_support import CHROMIUM, CHROMIUM_ARGS, LONG_S, open_page, serving

EXAMPLES = Path(__file__).parent / "data" / "examples"
@pytest.fixture(scope="module")
def server(tmp_path_factory, sync_api):
    folder = tmp_path_factory.mktemp("ui-live")
    with serving(folder, ["-m", "infinite_talk.cli", "ui", "--preset", "tiny", "--host", "127.0.0.1", "--port",
                          "PORT", "--output-dir", str(folder / "outputs")]) as served:
        yield served


def test_reload_shows_the_running_job_and_its_live_video_plays_before_it_ends(server, sync_api, tmp_path):
    expect = sync_api.expect
    data, rate = sf.read(EXAMPLES / "speech_en.wav", dtype="float32")
    speech = tmp_path / "speech_5s.wav"
    sf.write(speech, data[: 5 * rate], rate)  # 125 frames: 2 chunks
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = open_page(browser, server["url"])
        try:
            page.click("#load-btn")
            expect(page.locator("#load-status")).to_contain_text("Models loaded", timeout=LONG_S * 1000)
            page.locator("#ref-image input[type=file]").set_input_files(str(EXAMPLES / "portrait.png"))
            page.locator("#audio1 input[type=file]").set_input_files(str(speech))
            expect(page.locator("#request-plan")).to_contain_text("chunks: 2 → 125 frames", timeout=30_000)
            steps = page.locator("#steps input")
            steps.fill("120")  # chunk 2 runs long enough to watch chunk 1 play
            steps.press("Tab")
            expect(page.locator("#request-plan")).to_contain_text("steps that run: 120", timeout=30_000)
            page.click("#run-btn")
            expect(page.locator("#run-progress")).to_contain_text("chunk 1/2", timeout=LONG_S * 1000)

            page.reload()  # the job goes on; the reloaded page shows it and the loaded models
            page.wait_for_selector("#load-btn")
            expect(page.locator("#load-status")).to_contain_text("Models loaded (tiny geometry on cpu")
            expect(page.locator("#run-status")).to_contain_text("Running… job ")
            expect(page.locator("#run-progress")).to_contain_text("chunk ")
            expect(page.locator("#load-plan textarea")).to_have_value(re.compile("geometry: tiny"))
            second = open_page(browser, server["url"])  # a second tab sees the same
            expect(second.locator("#run-status")).to_contain_text("Running… job ")
            expect(second.locator("#load-status")).to_contain_text("Models loaded")

            expect(page.locator("#previews img")).to_have_count(1, timeout=LONG_S * 1000)  # chunk 1 finished
            page.wait_for_function("() => { const v = document.querySelector('#live-video');"
                                   " return v && Number(v.dataset.segments) >= 1 && v.currentTime > 0.5; }",
                                   timeout=60_000)
            assert page.evaluate("document.querySelector('#live-video').error") is None
            assert "Running… job " in page.inner_text("#run-status")  # it played before the job ended
            assert "chunk 2/2" in page.inner_text("#run-progress")

            second.close()  # closing a page cancels nothing; Cancel does
            page.click("#cancel-btn")
            status = page.locator("#run-status")
            expect(status).to_contain_text("Cancelled. cancelled at chunk 2/2", timeout=LONG_S * 1000)
            expect(status).to_contain_text("the 81 finished frames are kept in ")
            assert str(server["outputs"]) in status.inner_text()
            page.click("text=Results of this server")
            history = page.locator("#history")
            expect(history).to_contain_text("cancelled · portrait.png, speech_5s.wav · 81 frames")
            sidecar = history.locator("a", has_text="sidecar").first.get_attribute("href")
            assert page.request.get(urljoin(server["url"], sidecar)).json()["status"] == "cancelled"
            assert "Traceback" not in page.inner_text("body")
        except Exception as err:
            tail = server["log"].read_text()[-3000:]
            raise AssertionError(f"{err}\n--- server log:\n{tail}") from err
        finally:
            browser.close()
