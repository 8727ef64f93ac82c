"""Wiring of the metrics service: scrape the mesh's discovery statistics on a timer and serve
them as Prometheus text on ``GET /metrics``.

Instances that stop answering drop out of the next scrape (``aimesh_up`` disappears for them),
so a Prometheus ``absent()`` or ``up``-style alert sees dead instances.  The A/B statistics,
autoscaler and dashboard of the metrics issue build on this service.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.metrics.prometheus import CONTENT_TYPE, render
from shared.config import MetricsConfig, load_metrics_config
from shared.discovery import discover
from shared.httpserve import serve_app
from shared.schemas import MicroStats
from shared.service import Service

log = logging.getLogger(__name__)


class MetricsService(Service):
    name = "metrics"
    description = "Gathers metrics and spans, serves Prometheus and the dashboard, drives autoscaling."

    metrics_config: MetricsConfig
    http_url: str = ""
    _runner: web.AppRunner | None = None
    _scraper: asyncio.Task[None] | None = None
    _snapshots: list[MicroStats]

    async def setup(self) -> None:
        self.metrics_config = load_metrics_config()
        self._snapshots = []
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.http_url = await serve_app(app, self.metrics_config.host, self.metrics_config.port)
        self._scraper = asyncio.create_task(self._scrape_forever(), name="metrics-scrape")

    async def stop_intake(self) -> None:
        scraper, self._scraper = self._scraper, None
        if scraper is not None:
            scraper.cancel()
            await asyncio.gather(scraper, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def metadata(self) -> dict[str, str]:
        return {"http": self.http_url} if self.http_url else {}

    async def scrape(self) -> list[MicroStats]:
        wait_s = min(1.0, self.metrics_config.scrape_interval_s / 2)
        replies = await discover(self.nc, "STATS", MicroStats, wait_s=wait_s)
        return [s for s in replies if s.metadata.get("mesh") == self.config.prefix]

    async def _scrape_forever(self) -> None:
        while True:
            try:
                self._snapshots = await self.scrape()
            except Exception:  # NATS away: keep the last figures, try again next tick
                log.warning("metrics scrape failed", exc_info=True)
            await asyncio.sleep(self.metrics_config.scrape_interval_s)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=render(self._snapshots).encode(), headers={"Content-Type": CONTENT_TYPE})
