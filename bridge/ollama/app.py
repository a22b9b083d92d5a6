"""The Ollama listener: Ollama's API (bridge/ollama/routes.py) and the OpenAI endpoints, which
Ollama serves on its port too, on `--ollama-port` (11434 by default, where Ollama's clients look).

It runs in the bridge's process and shares its gRPC channel, its Host/Origin guard and its key
forwarding. Errors on /api/* have Ollama's shape, `{"error": "message"}` with the HTTP status;
/v1/* keeps OpenAI's. When the port is taken (a real Ollama, say) the bridge says so and runs
without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from tokenwire.bridge import host_guard
from tokenwire.bridge.config import BridgeSettings
from tokenwire.bridge.credentials import forward_credentials
from tokenwire.bridge.middleware import errors_and_log
from tokenwire.bridge.routes import embeddings, openai
from tokenwire.bridge.upstream import UPSTREAM, Upstream

from . import routes

log = logging.getLogger("tokenwire.bridge")


@web.middleware
async def ollama_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI-shaped errors (from errors_and_log, inside) become Ollama's on everything but /v1."""
    response = await handler(request)
    if request.path.startswith("/v1/") or response.status < 400 or not isinstance(response, web.Response):
        return response
    try:
        error = json.loads(response.body or b"{}").get("error")
    except (ValueError, AttributeError, TypeError):
        return response
    if not isinstance(error, dict):
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "x-request-id", "allow")}
    return web.json_response({"error": error.get("message", "")}, status=response.status, headers=headers)


def create_ollama_app(settings: BridgeSettings, upstream: Upstream) -> web.Application:
    app = web.Application(middlewares=[ollama_errors, errors_and_log, host_guard.host_guard, forward_credentials],
                          client_max_size=settings.max_body_bytes)
    host_guard.install(app, settings.host_policy)
    app[UPSTREAM] = upstream  # opened and closed by the bridge's own app
    routes.add_routes(app)
    openai.add_routes(app)
    embeddings.add_routes(app)
    return app


def runner_hooks(settings: BridgeSettings, upstream: Upstream
                 ) -> tuple[Callable[[web.Application], Awaitable[None]], Callable[[web.Application], Awaitable[None]]]:
    """(on_startup, on_cleanup) for the bridge's app: start and stop the Ollama listener with it."""
    state: dict[str, web.AppRunner] = {}

    async def start(_: web.Application) -> None:
        runner = web.AppRunner(create_ollama_app(settings, upstream), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.http_host, settings.ollama_port).start()
        except OSError as exc:
            await runner.cleanup()
            log.warning("Ollama API: port %d on %s is taken (%s; is Ollama itself running?): running without it; "
                        "set --ollama-port to another port, or 0 to turn it off",
                        settings.ollama_port, settings.http_host, exc.strerror or exc)
            return
        state["runner"] = runner
        log.info("Ollama API on http://%s:%d (/api/chat, /api/generate, /api/tags, ... and /v1)",
                 settings.http_host, settings.ollama_port)

    async def stop(_: web.Application) -> None:
        if "runner" in state:
            await state.pop("runner").cleanup()

    return start, stop
