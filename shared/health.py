"""Liveness and readiness over HTTP, for orchestrators' probes.

``GET /livez``: 200 while the process's event loop answers and the service has not failed.
``GET /readyz``: 200 only while the service is ready to take work (started, connected to NATS,
not draining), else 503 with the reason.  Both bodies are small JSON documents.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from shared.httpserve import serve_app


class HealthServer:
    def __init__(self, host: str, port: int, probe: Callable[[], tuple[bool, bool, str]]) -> None:
        """``probe`` returns (alive, ready, state description)."""
        self.host = host
        self.port = port
        self._probe = probe
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/livez", self._live)
        app.router.add_get("/readyz", self._ready)
        self._runner, self.url = await serve_app(app, self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _live(self, _: web.Request) -> web.Response:
        alive, _ready, state = self._probe()
        return web.json_response({"alive": alive, "state": state}, status=200 if alive else 503)

    async def _ready(self, _: web.Request) -> web.Response:
        _alive, ready, state = self._probe()
        return web.json_response({"ready": ready, "state": state}, status=200 if ready else 503)
