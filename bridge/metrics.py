"""Prometheus metrics of the bridge at /metrics, followed by the model server's own.

The bridge counts what it sees (requests by route and status, their durations, streams open);
the server knows the rest (queue, batch, TTFT and inter-token histograms, tokens, prefix cache,
model loads), so /metrics appends the server's exposition, fetched from `server_metrics_url`,
and one scrape target shows both.
"""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tokenwire.hosts import bearer_matches

from .config import BridgeSettings
from .errors import ApiError

METRICS = web.AppKey("metrics", object)
METRICS_SETTINGS = web.AppKey("metrics_settings", BridgeSettings)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tokenwire_bridge_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.seconds = Histogram("tokenwire_bridge_request_seconds", "HTTP request duration (streams: until closed)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.in_flight = Gauge("tokenwire_bridge_requests_in_flight", "HTTP requests being served (open streams included)",
                               registry=self.registry)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def metrics_middleware(metrics: BridgeMetrics):
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route(request)
        started = time.perf_counter()
        status = 499
        metrics.in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.seconds.labels(route).observe(time.perf_counter() - started)

    return middleware


async def serve_metrics(request: web.Request) -> web.Response:
    metrics: BridgeMetrics = request.app[METRICS]
    settings: BridgeSettings = request.app[METRICS_SETTINGS]
    if not bearer_matches(request.headers.get("Authorization"), settings.metrics_token):
        raise ApiError(401, "this metrics endpoint needs its scrape token: Authorization: Bearer <token>",
                       type="authentication_error", code="invalid_metrics_token",
                       headers={"WWW-Authenticate": 'Bearer realm="tokenwire metrics"'})
    body = generate_latest(metrics.registry).decode()
    if settings.server_metrics_url:
        headers = {"Authorization": f"Bearer {settings.metrics_token}"} if settings.metrics_token else {}
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with aiohttp.ClientSession(timeout=timeout) as http, \
                    http.get(settings.server_metrics_url, headers=headers) as resp:
                resp.raise_for_status()
                body += f"# the model server's metrics, from {settings.server_metrics_url}\n" + await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            body += f"# the model server's metrics are unavailable at {settings.server_metrics_url}: {exc}\n"
    return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application, settings: BridgeSettings) -> None:
    metrics = BridgeMetrics()
    app[METRICS] = metrics
    app[METRICS_SETTINGS] = settings
    app.middlewares.insert(0, metrics_middleware(metrics))  # outermost: sees the final status
    app.router.add_get("/metrics", serve_metrics)
