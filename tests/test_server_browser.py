"""The page at `/` in a real browser: Chrome/Chromium (the `browser_path` fixture finds it) driven
by Playwright (never `playwright install`). Types a prompt, presses Generate, and checks that the
<audio> element plays while the clip is still being generated, that the finished clip has the
requested duration, that it appears in the list, that its WAV download is a valid file and that it plays after a seek
(byte ranges); that a random seed is kept and "Use these settings" copies a clip's settings back;
and that Cancel leaves the page ready (not "Generating..." forever)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import soundfile as sf
from playwright.sync_api import sync_playwright

from mlx_music.runtime import load
from mlx_music.server import ServerConfig, create_app
from server_helpers import ROOT, UvicornThread, convert_embedded

DURATION = 10.0


def test_page_plays_while_generating_and_keeps_the_clip(tmp_path, browser_path):
    pipe = load(convert_embedded(tmp_path / "tiny"))
    app = create_app({"tiny-stereo": pipe}, ServerConfig(chunk_seconds=0.25, temp_root=str(tmp_path)))
    with UvicornThread(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path,
                                     args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 1")
            assert page.input_value("#model") == "tiny-stereo"
            page.fill("#prompt", "lofi beat with warm keys")
            page.fill("#duration", str(DURATION))
            page.fill("#seed", "42")
            page.fill("#top_k", "100")
            page.click("#generate")

            # The <audio> element is audible (currentTime > 0) while the stream is still open.
            page.wait_for_function("window.mm.events.some(e => e.type === 'audible')", timeout=120_000)
            page.screenshot(path=str(tmp_path / "while-generating.png"))
            page.wait_for_selector("#clips li", timeout=180_000)
            events = page.evaluate("window.mm.events")
            audible = next(e for e in events if e["type"] == "audible")
            end = next(e for e in events if e["type"] == "stream-end")
            assert audible["streaming"] is True and audible["t"] < end["t"]
            assert 0 < audible["received"] < DURATION * pipe.sample_rate  # not all audio had arrived yet
            assert end["seconds"] == DURATION
            assert page.text_content("#progress") == f"{DURATION:.2f} / {DURATION:.2f} s"

            # The clip is listed with its settings; its player has the requested duration.
            item = page.locator("#clips li").first
            assert item.locator(".prompt").text_content() == "lofi beat with warm keys"
            settings = item.locator(".settings").text_content()
            assert "seed 42" in settings and "top_k 100" in settings and f"{DURATION:.2f} s" in settings
            page.wait_for_function("document.querySelector('#clips li audio').duration > 0")
            assert abs(page.evaluate("document.querySelector('#clips li audio').duration") - DURATION) < 1e-3
            page.screenshot(path=str(tmp_path / "page.png"))  # the test artifact
            if os.environ.get("MLX_MUSIC_SAVE_SCREENSHOT"):  # refresh the README's picture
                (ROOT / "docs").mkdir(exist_ok=True)
                shutil.copy(tmp_path / "page.png", ROOT / "docs" / "screenshot.png")

            # The WAV link downloads a valid file of the requested length.
            with page.expect_download() as download:
                item.locator("a.wav").click()
            path = tmp_path / "download.wav"
            download.value.save_as(path)
            info = sf.info(str(path))
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 32000, 2)
            data, _ = sf.read(path, dtype="int16")
            assert data.shape == (round(DURATION * pipe.sample_rate), 2) and np.abs(data).max() > 0

            # A finished clip plays after a seek (the file answers byte ranges: 206).
            page.evaluate("(() => { const a = document.querySelector('#clips li audio'); a.currentTime = 6.0; "
                          "a.play(); })()")
            page.wait_for_function("document.querySelector('#clips li audio').currentTime > 6.3", timeout=60_000)
            seekable = page.evaluate("(() => { const s = document.querySelector('#clips li audio').seekable; "
                                     "return [s.length, s.end(0)]; })()")
            assert seekable[0] == 1 and abs(seekable[1] - DURATION) < 1e-3
            page.evaluate("document.querySelector('#clips li audio').pause()")

            # A random seed is kept with the clip, and "Use these settings" puts it back in the form.
            page.fill("#prompt", "short random one")
            page.fill("#duration", "1")
            page.fill("#seed", "")
            page.fill("#top_k", "")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#clips li').length === 2", timeout=120_000)
            seed = page.evaluate("window.mm.clips[1].settings.seed")
            assert isinstance(seed, int) and 0 <= seed <= 2**32 - 1  # runtime.sampling.SEED_MAX
            assert f"seed {seed}" in page.locator("#clips li").first.locator(".settings").text_content()
            page.fill("#prompt", "")
            page.locator("#clips li").first.locator("button.reuse").click()
            assert (page.input_value("#prompt"), page.input_value("#duration"), page.input_value("#seed"),
                    page.input_value("#top_k")) == ("short random one", "1", str(seed), "")
            page.locator("#clips li").nth(1).locator("button.reuse").click()
            assert (page.input_value("#seed"), page.input_value("#top_k")) == ("42", "100")

            # Cancel: the page says so (the clip is gone from the server) and is ready again.
            page.fill("#duration", "20")
            page.click("#generate")
            page.wait_for_function("window.mm.events.filter(e => e.type === 'created').length === 3")
            page.wait_for_function("parseFloat(document.querySelector('#progress').textContent) > 0", timeout=60_000)
            page.click("#cancel")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('Cancelled')",
                                   timeout=30_000)
            assert page.is_enabled("#generate") and not page.is_enabled("#cancel")
            assert page.evaluate("window.mm.events.filter(e => e.type === 'finished').pop().state") == "cancelled"
            assert page.locator("#clips li").count() == 2
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_page_asks_for_the_api_key_and_keeps_it_in_a_cookie(tmp_path, browser_path):
    pipe = load(convert_embedded(tmp_path / "tiny"))
    app = create_app({"tiny-stereo": pipe}, ServerConfig(temp_root=str(tmp_path), api_key="page-key"))
    with UvicornThread(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            asked = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept("page-key")))
            page.goto(srv.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 1")
            assert asked == ["This server needs its API key:"]
            assert page.evaluate("document.cookie") == "mlx_music_key=page-key"
            page.fill("#prompt", "with a key")
            page.fill("#duration", "0.5")
            page.click("#generate")
            page.wait_for_selector("#clips li", timeout=120_000)  # stream and file went through the cookie
            assert page.text_content("#status").startswith("Done")
        finally:
            browser.close()
