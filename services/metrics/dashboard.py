"""The metrics service's dashboard: one self-contained HTML page and the JSON it polls.

The page (``static/dashboard.html``, inline JS and CSS, nothing from a CDN: meshes run offline)
polls ``/api/overview`` every 2 s and draws its own canvas charts.  The routes only read what the
service keeps (a :class:`DashboardSource`), so they are cheap and never touch NATS.

- ``GET /``, ``GET /dashboard``: the page
- ``GET /api/overview``: ``{now, series, experiments, scale}``, series of the last 15 minutes
  (``?window_s=`` for another window)
- ``GET /api/experiments``, ``GET /api/experiments/{model}``: experiment reports
- ``GET /api/traces`` (``?limit=``), ``GET /api/traces/{trace_id}``: recent traces, one trace's spans

With API keys configured (``[metrics] api_keys``, :mod:`shared.apikeys`), :func:`key_check`
asks every route for one (scope ``read`` or ``admin``), Prometheus's ``/metrics`` too unless
``metrics_open``.  A browser gets a Basic login prompt: any user name, the key as password.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any, Protocol

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.metrics.timeseries import History
from services.metrics.traces import TraceStore
from shared.apikeys import KeyRing, presented_key
from shared.schemas import ExperimentReport, ScaleDecision

OVERVIEW_WINDOW_S = 900.0
SCOPES = ("read", "admin")  # the same access today: every route only reads
PROMETHEUS_PATH = "/metrics"
MAX_TRACES_LISTED = 200
_encoder = msgspec.json.Encoder()


class DashboardSource(Protocol):
    """What the dashboard reads: the metrics service provides it."""

    history: History
    traces: TraceStore

    def experiment_reports(self) -> list[ExperimentReport]: ...

    def experiment_report(self, model: str) -> ExperimentReport | None: ...

    def scale_decisions(self) -> dict[str, ScaleDecision]: ...  # the latest per pool


def page() -> bytes:
    """The dashboard's HTML (package data, read once per app)."""
    return resources.files("services.metrics").joinpath("static", "dashboard.html").read_bytes()


def add_routes(app: web.Application, source: DashboardSource) -> None:
    """Add the page and its JSON API to ``app``."""
    html = page()

    async def dashboard(_: web.Request) -> web.Response:
        return web.Response(body=html, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def overview(request: web.Request) -> web.Response:
        window_s = _number(request, "window_s", OVERVIEW_WINDOW_S, 10.0, 24 * 3600.0)
        now = time.time()
        return _json(
            {
                "now": now,
                "window_s": window_s,
                "series": source.history.snapshot(since=now - window_s),
                "experiments": source.experiment_reports(),
                "scale": source.scale_decisions(),
            }
        )

    async def experiments(_: web.Request) -> web.Response:
        return _json(source.experiment_reports())

    async def experiment(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        report = source.experiment_report(model)
        if report is None:
            return _json({"error": f"no experiment for model {model}"}, status=404)
        return _json(report)

    async def traces(request: web.Request) -> web.Response:
        limit = int(_number(request, "limit", 50, 1, MAX_TRACES_LISTED))
        return _json(source.traces.recent(limit))

    async def one_trace(request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        spans = source.traces.get(trace_id)
        if not spans:
            return _json({"error": f"no trace {trace_id} (only the last {source.traces.max_traces} are kept)"}, 404)
        return _json(spans)

    app.router.add_get("/", dashboard)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/experiments", experiments)
    app.router.add_get("/api/experiments/{model}", experiment)
    app.router.add_get("/api/traces", traces)
    app.router.add_get("/api/traces/{trace_id}", one_trace)


def parse_keys(entries: list[str]) -> KeyRing:
    """``["k1:read", "sha256:<hex>:admin"]`` → the metrics service's key ring (``ValueError`` if malformed)."""
    return KeyRing.parse(entries, SCOPES)


def key_check(keys: KeyRing, *, metrics_open: bool = True) -> Middleware:
    """A middleware that answers 401 (with a Basic login prompt, for browsers) to a request
    without a valid key; ``/metrics`` stays open when ``metrics_open``."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if metrics_open and request.path == PROMETHEUS_PATH:
            return await handler(request)
        if keys.scope_of(presented_key(request.headers)) is None:
            message = "a valid API key is required (Authorization: Bearer KEY, X-API-Key: KEY, or as the password)"
            response = _json({"error": message}, status=401)
            response.headers["WWW-Authenticate"] = 'Basic realm="aimesh metrics", charset="UTF-8"'
            return response
        return await handler(request)

    return check


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    """A numeric query parameter, clamped to [low, high]; malformed means the default."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    return min(high, max(low, value)) if value == value else default  # NaN → default
