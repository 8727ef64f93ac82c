"""The metrics dashboard: its stores (History, TraceStore), its JSON API over real HTTP, the page
itself rendered by a real headless Chromium (charts drawn, a trace's waterfall shown), and a real
request's trace reaching the API from real router and worker processes over NATS."""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from services.metrics.dashboard import add_routes
from services.metrics.service import MetricsService
from services.metrics.timeseries import History
from services.metrics.traces import TraceStore
from shared.config import MeshConfig
from shared.httpserve import serve_app
from shared.names import Names
from shared.schemas import (
    ExperimentReport,
    ScaleDecision,
    SpanBatch,
    SpanRecord,
    VariantReport,
)
from tests.helpers import ServiceProcess, eventually
from tests.mesh import deploy_digits, start_gateway

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHART_IDS = ("chart-rps", "chart-p99", "chart-errors", "chart-replicas", "chart-lag")


# -- History --------------------------------------------------------------------------------------


def test_history_keeps_only_the_last_keep_s() -> None:
    history = History(keep_s=60)
    for t in range(200):
        history.add(1000.0 + t, "rps", "digits@1", float(t))
    points = history.snapshot()["rps"]["digits@1"]
    assert points[0] == (1000.0 + 139, 139.0)
    assert points[-1] == (1000.0 + 199, 199.0)
    assert len(points) == 61


def test_history_snapshot_since_and_series_that_aged_out_disappear() -> None:
    history = History(keep_s=30)
    history.add(100.0, "replicas", "old-pool", 1)
    for t in range(100, 140):
        history.add(float(t), "rps", "digits@1", 1.0)
    snapshot = history.snapshot(since=135.0)
    assert [ts for ts, _ in snapshot["rps"]["digits@1"]] == [135.0, 136.0, 137.0, 138.0, 139.0]
    assert "replicas" not in snapshot  # its only point is older than the window
    assert len(history) == 1


def test_history_puts_a_late_point_in_its_place() -> None:
    history = History(keep_s=100)
    for ts in (10.0, 11.0, 13.0):
        history.add(ts, "p99_ms", "digits@2", ts)
    history.add(12.0, "p99_ms", "digits@2", 12.0)
    assert [ts for ts, _ in history.snapshot()["p99_ms"]["digits@2"]] == [10.0, 11.0, 12.0, 13.0]


def test_history_caps_keys_by_dropping_the_least_recently_updated() -> None:
    history = History(keep_s=100, max_keys=3)
    history.add(1.0, "rps", "a@1", 1)
    history.add(1.0, "rps", "b@1", 1)
    history.add(1.0, "rps", "c@1", 1)
    history.add(2.0, "rps", "a@1", 2)  # a is fresh again: b is now the stalest
    history.add(2.0, "rps", "d@1", 1)
    assert sorted(history.snapshot()["rps"]) == ["a@1", "c@1", "d@1"]
    assert history.dropped_keys == 1
    for i in range(50):
        history.add(3.0, "rps", f"user-{i}@1", 1)
    assert len(history) == 3
    assert history.dropped_keys == 51


# -- TraceStore -----------------------------------------------------------------------------------


def span(
    trace_id: str,
    span_id: str,
    parent_id: str,
    name: str,
    service: str,
    start_ms: float,
    dur_ms: float,
    *,
    kind: str = "INTERNAL",
    error: bool = False,
    base_ns: int = 1_700_000_000_000_000_000,
    attributes: dict[str, str] | None = None,
) -> SpanRecord:
    start = base_ns + int(start_ms * 1e6)
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        name=name,
        kind=kind,
        service=service,
        start_ns=start,
        end_ns=start + int(dur_ms * 1e6),
        error=error,
        attributes=attributes or {},
    )


def request_trace(trace_id: str, base_ns: int, *, error: bool = False, slow: float = 1.0) -> list[SpanRecord]:
    """A classify request: router HTTP span → NATS request → inference worker → batch forward."""
    t = trace_id
    ids = [f"{trace_id[:8]}{i:08x}" for i in range(1, 6)]
    subject = "aimesh.infer.digits.2"
    return [
        span(
            t,
            ids[0],
            "",
            "POST /v2/models/{model}/infer",
            "router",
            0,
            9.5 * slow,
            kind="SERVER",
            error=error,
            base_ns=base_ns,
            attributes={"http.request.method": "POST", "http.route": "/v2/models/{model}/infer"},
        ),
        span(
            t,
            ids[1],
            ids[0],
            "send aimesh.infer.{model}.{version}",
            "router",
            0.6,
            8.1 * slow,
            kind="CLIENT",
            error=error,
            base_ns=base_ns,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ),
        span(
            t,
            ids[2],
            ids[1],
            "process aimesh.infer.{model}.{version}",
            "inference",
            1.1,
            7.2 * slow,
            kind="CONSUMER",
            error=error,
            base_ns=base_ns,
            attributes={"messaging.system": "nats", "messaging.consumer.group.name": "aimesh-infer-digits-2"},
        ),
        span(
            t,
            ids[3],
            ids[2],
            "batch digits@2",
            "inference",
            2.4,
            4.4 * slow,
            base_ns=base_ns,
            error=error,
            attributes={"batch.size": "8"},
        ),
        span(
            t,
            ids[4],
            ids[3],
            "forward",
            "inference",
            2.9,
            3.5 * slow,
            base_ns=base_ns,
            error=error,
            attributes={"device": "cpu"} | ({"error.type": "RuntimeError"} if error else {}),
        ),
    ]


def test_trace_store_assembles_a_trace_from_batches_in_any_order() -> None:
    store = TraceStore()
    spans = request_trace("ab" * 16, 1_000_000)
    router, inference = spans[:2], spans[2:]
    # The inference worker's batch lands first: its top span's parent is not here yet.
    store.add(SpanBatch(service="inference", instance="i1", spans=list(reversed(inference))))
    (partial,) = store.recent()
    assert partial["root"] == "process aimesh.infer.{model}.{version}"
    assert partial["spans"] == 3
    store.add(SpanBatch(service="router", instance="r1", spans=router))
    store.add(SpanBatch(service="router", instance="r1", spans=router))  # delivered twice: counted once
    (summary,) = store.recent()
    assert summary == {
        "trace_id": "ab" * 16,
        "root": "POST /v2/models/{model}/infer",
        "service": "router",
        "start_ns": spans[0].start_ns,
        "duration_ms": pytest.approx(9.5),
        "spans": 5,
        "error": False,
    }
    assert [s.span_id for s in store.get("AB" * 16)] == [s.span_id for s in spans]
    assert store.get("cd" * 16) == []


def test_trace_store_lists_newest_first_and_evicts_the_oldest() -> None:
    store = TraceStore(max_traces=3)
    for i in range(5):
        store.add(SpanBatch(service="router", instance="r1", spans=request_trace(f"{i:032x}", i * 10**9, error=i == 4)))
    recent = store.recent()
    assert [t["trace_id"] for t in recent] == [f"{i:032x}" for i in (4, 3, 2)]
    assert recent[0]["error"] is True and recent[1]["error"] is False
    assert store.evicted_traces == 2
    assert store.get(f"{0:032x}") == []
    assert len(store.recent(limit=2)) == 2


def test_trace_store_caps_spans_per_trace() -> None:
    store = TraceStore(max_spans_per_trace=3)
    store.add(SpanBatch(service="router", instance="r1", spans=request_trace("ef" * 16, 0)))
    assert len(store.get("ef" * 16)) == 3
    assert store.dropped_spans == 2


# -- the app: realistic data behind real HTTP ------------------------------------------------------


@dataclass
class Source:
    history: History
    traces: TraceStore
    reports: dict[str, ExperimentReport] = field(default_factory=dict)
    scale: dict[str, ScaleDecision] = field(default_factory=dict)

    def experiment_reports(self) -> list[ExperimentReport]:
        return [self.reports[m] for m in sorted(self.reports)]

    def experiment_report(self, model: str) -> ExperimentReport | None:
        return self.reports.get(model)

    def scale_decisions(self) -> dict[str, ScaleDecision]:
        return dict(self.scale)


def digits_report(now: float) -> ExperimentReport:
    return ExperimentReport(
        model="digits",
        experiment="mlp-vs-cnn",
        state="running",
        control="1",
        variants=[
            VariantReport(
                version="1",
                weight=50,
                requests=10_412,
                errors=21,
                error_rate=0.002,
                p50_ms=3.1,
                p95_ms=7.9,
                p99_ms=12.4,
                rewards=4_980,
                reward_mean=0.912,
                reward_ci_low=0.902,
                reward_ci_high=0.921,
                p_value=1.0,
            ),
            VariantReport(
                version="2",
                weight=50,
                requests=10_377,
                errors=35,
                error_rate=0.0034,
                p50_ms=4.2,
                p95_ms=10.8,
                p99_ms=17.9,
                rewards=5_011,
                reward_mean=0.951,
                reward_ci_low=0.943,
                reward_ci_high=0.958,
                lift=0.039,
                p_value=0.0004,
            ),
        ],
        verdict="promote",
        reason="digits@2 beats the control: lift +0.039 reward, p=0.0004 < α=0.05 after 10,377 requests",
        winner="2",
        min_samples=1000,
        alpha=0.05,
        updated_at=now - 1,
    )


def filled_source(now: float, minutes: int = 4) -> Source:
    """A few minutes of what the service records each tick, a few traces, one experiment."""
    rng = random.Random(7)
    history = History(keep_s=900)
    start = now - minutes * 60
    for i in range(minutes * 60):
        ts = start + i
        wave = math.sin(i / 25)
        for version, base, latency in (("1", 40.0, 12.0), ("2", 38.0, 17.0)):
            key = f"digits@{version}"
            history.add(ts, "rps", key, max(0.0, base + 8 * wave + rng.uniform(-3, 3)))
            history.add(ts, "p99_ms", key, latency + 3 * wave + rng.uniform(0, 4) + (25 if 150 < i < 160 else 0))
            history.add(
                ts,
                "error_rate",
                key,
                max(0.0, 0.003 + rng.uniform(-0.002, 0.003) + (0.04 if i > 200 and version == "2" else 0)),
            )
        history.add(ts, "replicas", "inference", 2 if i < 90 else 3 if i < 180 else 2)
        history.add(ts, "lag", "inference", max(0, int(30 * wave + rng.uniform(-5, 10))) if 60 < i < 200 else 0)
    traces = TraceStore()
    for n in range(6):
        trace_id = f"{rng.getrandbits(128):032x}"
        spans = request_trace(trace_id, int((now - 60 + n * 9) * 1e9), error=n == 3, slow=1 + n * 0.3)
        # each service flushes its own batch; the inference one often first
        traces.add(SpanBatch(service="inference", instance="inference-1", spans=spans[2:]))
        traces.add(SpanBatch(service="router", instance="router-1", spans=spans[:2]))
    return Source(
        history=history,
        traces=traces,
        reports={"digits": digits_report(now)},
        scale={
            "inference": ScaleDecision(
                pool="inference", desired=3, current=2, reason="p99 18 ms over 15 ms target", ts=now - 2
            )
        },
    )


@pytest.fixture
async def dashboard() -> AsyncIterator[tuple[str, Source]]:
    source = filled_source(time.time())
    app = web.Application()
    add_routes(app, source)
    runner, url = await serve_app(app, "127.0.0.1", 0)
    try:
        yield url, source
    finally:
        await runner.cleanup()


async def get(url: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.read()
        kind = response.content_type
        return response.status, msgspec.json.decode(body) if kind == "application/json" else body.decode(), kind


async def test_page_is_served_self_contained(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    for path in ("/", "/dashboard"):
        status, html, kind = await get(url + path)
        assert (status, kind) == (200, "text/html")
        assert "<canvas" in html and "api/overview" in html
        # Meshes run offline: nothing may be fetched from elsewhere.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert "@import" not in html


async def test_overview_has_series_experiments_and_scale(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, overview, _ = await get(url + "/api/overview")
    assert status == 200
    assert abs(overview["now"] - time.time()) < 60
    assert set(overview["series"]) == {"rps", "p99_ms", "error_rate", "replicas", "lag"}
    assert set(overview["series"]["rps"]) == {"digits@1", "digits@2"}
    points = overview["series"]["replicas"]["inference"]
    assert len(points) == 240 and points[0][0] < points[-1][0]
    assert overview["experiments"][0]["model"] == "digits"
    assert overview["experiments"][0]["variants"][1]["p_value"] == 0.0004
    assert overview["scale"]["inference"]["desired"] == 3
    _, narrow, _ = await get(url + "/api/overview?window_s=30")
    assert 25 <= len(narrow["series"]["rps"]["digits@1"]) <= 31


async def test_experiment_routes(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, reports, _ = await get(url + "/api/experiments")
    assert status == 200 and [r["model"] for r in reports] == ["digits"]
    status, report, _ = await get(url + "/api/experiments/digits")
    assert status == 200
    assert msgspec.convert(report, ExperimentReport).winner == "2"
    status, missing, _ = await get(url + "/api/experiments/letters")
    assert (status, missing) == (404, {"error": "no experiment for model letters"})


async def test_trace_routes(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, recent, _ = await get(url + "/api/traces")
    assert status == 200 and len(recent) == 6
    assert [t["start_ns"] for t in recent] == sorted((t["start_ns"] for t in recent), reverse=True)
    assert {t["root"] for t in recent} == {"POST /v2/models/{model}/infer"}
    assert sum(t["error"] for t in recent) == 1
    _, two, _ = await get(url + "/api/traces?limit=2")
    assert len(two) == 2
    status, spans, _ = await get(url + f"/api/traces/{recent[0]['trace_id']}")
    assert status == 200
    records = msgspec.convert(spans, list[SpanRecord])
    assert [s.service for s in records] == ["router", "router", "inference", "inference", "inference"]
    assert records[1].parent_id == records[0].span_id
    status, missing, _ = await get(url + "/api/traces/" + "0" * 32)
    assert status == 404 and "no trace" in missing["error"]


# -- a real trace, over NATS ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_real_requests_trace_reaches_the_api_over_nats(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    http: aiohttp.ClientSession,
) -> None:
    # Tracing on, no OTLP endpoint: the spans' only way out is <prefix>.spans.<service>.
    traced = {"OTEL_SDK_DISABLED": "false", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    _, _, base = await start_gateway(spawn, nats_url, names, router_env=traced, worker_env=traced)
    await deploy_digits(nc, names)
    async with MetricsService(fast) as metrics:
        # The services record 1% of their own roots, and every trace their caller sampled: this one.
        trace_id, caller = uuid.uuid4().hex, "00f067aa0ba902b7"
        body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        headers = {"traceparent": f"00-{trace_id}-{caller}-01"}
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

        async def whole_trace() -> list[SpanRecord] | None:
            async with http.get(f"{metrics.http_url}/api/traces/{trace_id}") as resp:
                if resp.status == 404:  # no span of it has arrived yet
                    return None
                assert resp.status == 200, await resp.text()
                spans = msgspec.convert(await resp.json(), list[SpanRecord])
            kinds = {(s.service, s.kind) for s in spans}
            wanted = {("router", "SERVER"), ("router", "CLIENT"), ("inference", "CONSUMER")}
            return spans if wanted <= kinds and any(s.name == "forward digits" for s in spans) else None

        spans = await eventually(whole_trace, 30, "the router's and the worker's spans at /api/traces/{id}")
        assert {s.trace_id for s in spans} == {trace_id}
        server = next(s for s in spans if s.kind == "SERVER")
        send = next(s for s in spans if s.kind == "CLIENT")
        process = next(s for s in spans if s.kind == "CONSUMER")
        forward = next(s for s in spans if s.name == "forward digits")
        assert server.name == "POST /v2/models/{model}/infer" and server.parent_id == caller
        assert send.parent_id == server.span_id and send.service == "router"
        assert process.parent_id == send.span_id and process.service == "inference"
        assert forward.parent_id == process.span_id and forward.service == "inference"
        assert spans[0] == server  # parents first

        async with http.get(f"{metrics.http_url}/api/traces?limit=200") as resp:
            summaries = await resp.json()
        (summary,) = [t for t in summaries if t["trace_id"] == trace_id]
        assert summary["root"] == server.name and summary["service"] == "router"
        assert summary["spans"] == len(spans) and summary["error"] is False
        assert summary["start_ns"] == server.start_ns


# -- the page in a real browser -------------------------------------------------------------------


def chromium_path() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (/usr/bin/chromium not found)")
    pytest.skip("no Chromium at /usr/bin/chromium: the browser tests of the dashboard need one (apt install chromium)")


async def chromium(*args: str, timeout_s: float = 90.0) -> str:
    """Run headless Chromium with a fresh profile; returns its stdout (e.g. ``--dump-dom``)."""
    binary = chromium_path()
    with tempfile.TemporaryDirectory(prefix="aimesh-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"chromium did not finish within {timeout_s}s") from None
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    return out.decode(errors="replace")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def tag(dom: str, element_id: str) -> str:
    found = re.search(rf"<[a-z]+[^>]*\bid=\"{element_id}\"[^>]*>", dom)
    assert found, f"no element #{element_id} in the page"
    return found.group(0)


async def test_page_draws_every_chart_in_a_browser(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    dom = await chromium("--virtual-time-budget=8000", "--dump-dom", url + "/")
    assert re.search(r"<body[^>]*data-ready=\"true\"", dom), "the first overview was never rendered"
    for chart in CHART_IDS:
        assert 'data-drawn="true"' in tag(dom, chart), f"{chart} drew no series"
    assert "digits@2" in dom and "mlp-vs-cnn" in dom  # legends and the experiment table
    assert dom.count("POST /v2/models/{model}/infer") >= 6  # the recent traces


async def test_dashboard_screenshot(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    await chromium("--virtual-time-budget=8000", f"--screenshot={shot}", "--window-size=1400,1000", url + "/")
    assert shot.exists(), "chromium wrote no screenshot"
    assert png_size(shot) == (1400, 1000)
    assert shot.stat().st_size > 40_000, "the screenshot is suspiciously small: an empty page?"


async def test_trace_waterfall_opens_from_the_url(dashboard: tuple[str, Source]) -> None:
    url, source = dashboard
    failed = next(t for t in source.traces.recent() if t["error"])
    page = f"{url}/#trace={failed['trace_id']}"
    dom = await chromium("--virtual-time-budget=8000", "--dump-dom", page)
    waterfall = tag(dom, "waterfall")
    assert 'data-drawn="true"' in waterfall and 'data-spans="5"' in waterfall
    assert "ERROR" in dom and "RuntimeError" in dom  # the failing span is selected, its attributes shown
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-trace.png"
    shot.unlink(missing_ok=True)
    await chromium("--virtual-time-budget=8000", f"--screenshot={shot}", "--window-size=1400,1000", page)
    assert shot.exists() and png_size(shot) == (1400, 1000)
    assert shot.stat().st_size > 30_000
