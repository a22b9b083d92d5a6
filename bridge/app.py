"""Wires the bridge together: settings, the gRPC channel, routes, and the HTTP server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from . import host_guard, metrics, openapi
from .config import BridgeSettings
from .credentials import forward_credentials
from .middleware import errors_and_log
from .routes import audio, chats, embeddings, openai, static, stream
from .upstream import UPSTREAM, Upstream

log = logging.getLogger("tokenwire.bridge")

SETTINGS = web.AppKey("settings", BridgeSettings)


async def healthz(request: web.Request) -> web.Response:
    """The bridge is up (liveness); says nothing about the gRPC server: /readyz does."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while the gRPC server answers its health check SERVING; 503 while it is
    starting, draining (NOT_SERVING on SIGTERM) or unreachable, so a router sends no new work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    upstream = request.app[UPSTREAM]
    try:
        reply = await health_pb2_grpc.HealthStub(upstream.channel).Check(
            health_pb2.HealthCheckRequest(service="tokenwire.v1.Inference"), timeout=2)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        status = f"unreachable ({exc.code().name})"
    ready = status == "SERVING"
    return web.json_response({"status": "ready" if ready else "not ready", "server": status},
                             status=200 if ready else 503)


def create_app(grpc_target: str | None = None, settings: BridgeSettings | None = None) -> web.Application:
    """The aiohttp application. Run it with `handler_cancellation=True` (as run_bridge does) so that a
    client that disconnects cancels its gRPC call even while nothing is being written to it."""
    settings = settings or BridgeSettings()
    if grpc_target:
        settings.grpc_target = grpc_target
    settings.validate()
    app = web.Application(middlewares=[errors_and_log, host_guard.host_guard, forward_credentials],
                          client_max_size=settings.max_body_bytes)
    host_guard.install(app, settings.host_policy)
    metrics.install(app, settings)
    upstream = Upstream(settings)
    app[SETTINGS] = settings
    app[UPSTREAM] = upstream

    async def channel(app: web.Application) -> AsyncIterator[None]:
        await upstream.open()
        yield
        await upstream.close()

    app.cleanup_ctx.append(channel)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    stream.add_routes(app)
    chats.add_routes(app)
    openai.add_routes(app)
    embeddings.add_routes(app)
    audio.add_routes(app)
    openapi.add_routes(app)
    static.add_routes(app, settings.static_dir)
    return app


def run_bridge(settings: BridgeSettings) -> None:
    """Serves until interrupted."""
    app = create_app(settings=settings)

    async def announce(app: web.Application) -> None:
        log.info("tokenwire bridge on http://%s:%d (gRPC server %s; heartbeat %.1fs; max body %d bytes)",
                 settings.http_host, settings.http_port, settings.grpc_target, settings.heartbeat_s,
                 settings.max_body_bytes)

    app.on_startup.append(announce)
    if settings.ollama_port:
        from .ollama.app import runner_hooks

        start_ollama, stop_ollama = runner_hooks(settings, app[UPSTREAM])
        app.on_startup.append(start_ollama)
        app.on_cleanup.insert(0, stop_ollama)
    ssl_context = None
    if settings.http_tls_cert:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.http_tls_cert, settings.http_tls_key)
    web.run_app(app, host=settings.http_host, port=settings.http_port, access_log=None,
                handler_cancellation=True, print=None, ssl_context=ssl_context)
