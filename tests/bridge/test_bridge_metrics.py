"""/metrics on the bridge: its own counters, and the model server's metrics behind them."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from conftest import DEFAULT_INT4
from prometheus_client.parser import text_string_to_metric_families

GENERATE_200 = ("tokenwire_bridge_requests_total", {"method": "POST", "route": "/api/generate", "status": "200"})
NOT_FOUND = ("tokenwire_bridge_requests_total", {"method": "GET", "route": "unmatched", "status": "404"})
SERVER_TOKENS = ("tokenwire_tokens_generated_total", {"model": DEFAULT_INT4})
SERVER_LENGTH = ("tokenwire_requests_total", {"model": DEFAULT_INT4, "finish_reason": "length"})
SERVER_BATCH = ("tokenwire_batch_size", {"model": DEFAULT_INT4})


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[str, dict]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return text, {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, metric: tuple[str, dict]) -> float:
    name, labels = metric
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_bridge_metrics_show_requests_and_the_servers_figures(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 10
        while value((before := await scrape(http, bridge.url))[1], SERVER_BATCH) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # earlier tests' generations end first
        before = before[1]
        body = {"prompt": "Metrics through the bridge", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        async with http.post(bridge.url + "/api/generate", json=body) as resp:
            assert resp.status == 200
            await resp.read()
        async with http.get(bridge.url + "/no/such/route") as resp:
            assert resp.status == 404
        deadline = time.monotonic() + 10  # the server counts a request's last token just after sending it
        while (value((after := await scrape(http, bridge.url))[1], SERVER_TOKENS) - value(before, SERVER_TOKENS) < 4
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
    text, after = after
    assert "tokenwire_bridge_request_seconds_bucket" in text
    # The bridge counts its own requests, and the server's figures behind them are fresh: each
    # counter moved by exactly this one generation of 4 tokens.
    assert {name: value(after, metric) - value(before, metric) for name, metric in (
        ("bridge /api/generate 200", GENERATE_200), ("bridge 404", NOT_FOUND), ("server tokens", SERVER_TOKENS),
        ("server finished by length", SERVER_LENGTH))} == {
        "bridge /api/generate 200": 1, "bridge 404": 1, "server tokens": 4, "server finished by length": 1}
    # The server's own metrics follow: queue, batch, latency histograms, tokens, finish reasons.
    for name in ("tokenwire_queue_length", "tokenwire_batch_size", "tokenwire_time_to_first_token_seconds_bucket",
                 "tokenwire_inter_token_latency_seconds_bucket", "tokenwire_tokens_generated_total",
                 'tokenwire_requests_total{finish_reason="length"', "tokenwire_model_load_seconds_count"):
        assert name in text, name
