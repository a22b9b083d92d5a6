"""Serves the web page: bridge/static/index.html at / and the folder at /static/.

The folder is looked up on every request, so a page added later is served without a restart
and a missing folder is a 404, never a start-up failure.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tokenwire.bridge.errors import ApiError


def _not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found", code="not_found")


def add_routes(app: web.Application, static_dir: Path) -> None:
    root = static_dir.resolve()

    async def index(request: web.Request) -> web.FileResponse:
        page = root / "index.html"
        if not page.is_file():
            raise ApiError(404, "the web page is not installed (bridge/static/index.html is missing); "
                           "the APIs are under /api/ and /v1/, described at /openapi.json", code="not_found")
        return web.FileResponse(page, headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.FileResponse:
        rel = request.match_info["path"]
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise _not_found(f"/static/{rel}")
        headers = {"Cache-Control": "no-cache"}
        if target.suffix == ".js":  # ES modules; Python < 3.12 would guess application/javascript
            headers["Content-Type"] = "text/javascript; charset=utf-8"
        return web.FileResponse(target, headers=headers)

    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static)
