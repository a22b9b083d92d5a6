"""The web page's microphone button in Chromium, recording from a fake microphone that plays a
sentence synthesised with espeak-ng (--use-file-for-fake-audio-capture): the transcript lands in the
message box, to edit before sending. And where the page may not record (no navigator.mediaDevices:
not localhost, not HTTPS), the button says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from speech_audio import SENTENCES, duration, join, synth, wer

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: `make browser` installs it")
SENTENCE = SENTENCES[0]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> tuple[Path, float]:
    """A WAV of the sentence with a second of silence after it (Chromium plays the file in a loop)."""
    path = tmp_path_factory.mktemp("mic") / "sentence.wav"
    wav = join([synth(SENTENCE), synth(" ")], gap_s=1.0)
    path.write_bytes(wav)
    return path, duration(wav)


@pytest.fixture(scope="module")
def mic_browser(spoken):
    path, _ = spoken
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={path}"])
        yield b
        b.close()


def _page(browser, url: str, errors: list[str]):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    page.wait_for_selector("body[data-models=ready]")
    return context, page


def test_speaking_puts_the_transcript_in_the_message_box(mic_browser, bridge, spoken):
    _, seconds = spoken
    errors: list[str] = []
    context, page = _page(mic_browser, bridge.url + "/", errors)
    try:
        # The picker offers chat models only.
        options = page.eval_on_selector_all("#model-select option", "els => els.map(o => o.value)")
        assert options and not any(o.startswith(("whisper", "ppocr", "all-minilm")) for o in options), options
        page.fill("#prompt", "Typed first:")
        page.click("#mic")
        page.wait_for_selector("#mic[data-state=recording]")
        page.wait_for_timeout(int((seconds - 0.5) * 1000))  # the sentence, once
        page.click("#mic")
        page.wait_for_selector("#mic[data-state=idle]", timeout=60_000)
        text = page.input_value("#prompt")
        assert text.startswith("Typed first: "), (text, page.inner_text("#mic-status"))
        assert wer(SENTENCE, text.removeprefix("Typed first: ")) <= 0.25, text
        assert page.is_hidden("#mic-status")
        assert page.evaluate("document.activeElement.id") == "prompt"  # to edit, then send
    finally:
        context.close()
    assert not errors, errors


def test_without_a_secure_page_the_button_says_why(mic_browser, bridge):
    """A page at a non-localhost http:// address gets no navigator.mediaDevices: 127.0.0.1 counts as
    secure, so the test takes mediaDevices away before the page's modules run."""
    errors: list[str] = []
    context = mic_browser.new_context()
    context.add_init_script("Object.defineProperty(navigator, 'mediaDevices', {value: undefined})")
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(bridge.url + "/")
        page.wait_for_selector("body[data-models=ready]")
        assert "localhost or over HTTPS" in page.get_attribute("#mic", "title")
        page.click("#mic")
        status = page.inner_text("#mic-status")
        assert "secure page" in status and "HTTPS" in status
    finally:
        context.close()
    assert not errors, errors
