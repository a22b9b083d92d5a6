"""--metrics-token (Security issue, 2): the full metrics need a scrape token on the server's metrics
port and on the bridge's /metrics, and the bridge fetches the server's with it."""

from __future__ import annotations

import urllib.error
import urllib.request

from conftest import free_port, start_bridge, start_server

TOKEN = "scrape-7f3a9c"


def get(url: str, token: str = "") -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_need_the_scrape_token(models_dir, tmp_path) -> None:
    metrics_port = free_port()
    server = start_server(tmp_path, models_dir, "--metrics-port", str(metrics_port), "--metrics-token", TOKEN)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    bridge = start_bridge(tmp_path, server.target, "--server-metrics-url", url, "--metrics-token", TOKEN)
    try:
        assert get(url)[0] == 401 and get(url, "wrong")[0] == 401
        code, text = get(url, TOKEN)
        assert code == 200 and "tokenwire_tokens_generated" in text
        assert get(bridge.url + "/metrics")[0] == 401
        code, text = get(bridge.url + "/metrics", TOKEN)
        assert code == 200 and "tokenwire_bridge_" in text and "tokenwire_tokens_generated" in text
    finally:
        bridge.stop()
        server.stop()
