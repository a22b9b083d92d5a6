"""The web page on a server with API keys (Security issue, 17): the first 401 shows a sign-in box;
the key entered is kept in this tab's session storage (not localStorage) and sent as
`Authorization: Bearer` with every request, so the page works; a refused key asks again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import cli, start_bridge, start_server
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def test_the_page_signs_in_with_a_key(models_dir, tmp_path: Path) -> None:
    db = str(tmp_path / "web-keys.db")
    done = subprocess.run(cli("keys", "create", "alice", "--database", db), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    bridge = start_bridge(tmp_path, server.target)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_context().new_page()
            page.set_default_timeout(30_000)
            sent: list[str] = []
            page.on("request", lambda r: sent.append(r.headers.get("authorization", "")) if "/api/" in r.url else None)
            page.goto(bridge.url + "/")
            page.wait_for_selector("[data-testid=signin]:not([hidden])")
            assert page.evaluate("document.body.dataset.models") != "ready"
            page.fill("#signin-key", "tw_wrong")
            page.click("#signin button[type=submit]")
            page.wait_for_selector("#signin-error:not([hidden])")  # a refused key asks again
            page.fill("#signin-key", key)
            page.click("#signin button[type=submit]")
            page.wait_for_selector("body[data-models=ready]")
            assert page.locator("[data-testid=signin]").is_hidden()
            assert page.evaluate("sessionStorage.getItem('tokenwire.apiKey')") == key
            assert key not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
            assert f"Bearer {key}" in sent, "the page's requests carry the key"
            browser.close()
    finally:
        bridge.stop()
        server.stop()
