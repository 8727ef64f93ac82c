"""Wiring of the router: the HTTP listener next to the runtime's own endpoints."""

from __future__ import annotations

from aiohttp import web

from services.router.http import build_app
from shared.config import RouterConfig, load_router_config
from shared.httpserve import serve_app
from shared.service import Service


class RouterService(Service):
    name = "router"
    description = "The HTTP gateway: Open Inference Protocol v2 and OpenAI-compatible APIs, with A/B splits."

    router_config: RouterConfig
    _runner: web.AppRunner | None = None
    http_url: str = ""

    async def setup(self) -> None:
        self.router_config = load_router_config()
        app = build_app(self, max_body_bytes=self.router_config.max_body_bytes)
        self._runner, self.http_url = await serve_app(app, self.router_config.host, self.router_config.port)

    async def stop_intake(self) -> None:
        # Close the listener and finish in-flight HTTP requests before the actors drain.
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def metadata(self) -> dict[str, str]:
        return {"http": self.http_url} if self.http_url else {}
