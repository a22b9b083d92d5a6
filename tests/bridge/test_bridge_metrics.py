"""/metrics on the bridge: its own counters, and the model server's metrics behind them."""

from __future__ import annotations

import aiohttp


async def test_bridge_metrics_show_requests_and_the_servers_figures(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "Metrics through the bridge", "max_tokens": 4, "temperature": 0}
        async with http.post(bridge.url + "/api/generate", json=body) as resp:
            assert resp.status == 200
            await resp.read()
        async with http.get(bridge.url + "/no/such/route") as resp:
            assert resp.status == 404
        async with http.get(bridge.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert 'tokenwire_bridge_requests_total{method="POST",route="/api/generate",status="200"}' in text
    assert 'status="404"' in text and "tokenwire_bridge_request_seconds_bucket" in text
    # The server's own metrics follow: queue, batch, latency histograms, tokens, finish reasons.
    for name in ("tokenwire_queue_length", "tokenwire_batch_size", "tokenwire_time_to_first_token_seconds_bucket",
                 "tokenwire_inter_token_latency_seconds_bucket", "tokenwire_tokens_generated_total",
                 'tokenwire_requests_total{finish_reason="length"', "tokenwire_model_load_seconds_count"):
        assert name in text, name
