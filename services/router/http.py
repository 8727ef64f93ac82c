"""The gateway's HTTP routes (aiohttp).  Handlers ask the service for state; they never touch
NATS directly, so the routes can be tested against any object with the same shape."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

SERVER_NAME = "aimesh"


class GatewayState(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def is_ready(self) -> bool: ...


def build_app(state: GatewayState, *, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)

    async def live(_: web.Request) -> web.Response:
        # Open Inference Protocol v2: the status code carries the answer, the body mirrors it.
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        ok = state.is_ready
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_metadata(_: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": state.version, "extensions": []})

    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    return app
