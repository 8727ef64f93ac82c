"""Fixed data for the metrics dashboard's tests: spans of a classify request, a few minutes of
history, traces and an experiment behind the dashboard's routes, served over real HTTP."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from services.metrics.dashboard import add_routes
from services.metrics.timeseries import History
from services.metrics.traces import TraceStore
from shared.httpserve import serve_app
from shared.schemas import (
    ExperimentReport,
    ScaleDecision,
    SpanBatch,
    SpanRecord,
    VariantReport,
)


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


@asynccontextmanager
async def serve_dashboard(source: Source) -> AsyncIterator[tuple[str, Source]]:
    """The dashboard's routes over ``source`` on a free port: its URL and the source."""
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
