"""A real request's trace reaches the dashboard's API from real router and worker processes,
over NATS (the spans subjects), with no OTLP endpoint."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.service import MetricsService
from shared.config import MeshConfig, MetricsConfig
from shared.names import Names
from shared.schemas import SpanRecord
from tests.helpers import ServiceProcess, eventually
from tests.mesh import deploy_digits, start_gateway


@pytest.mark.slow
async def test_a_real_requests_trace_reaches_the_api_over_nats(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    # Tracing on, no OTLP endpoint: the spans' only way out is <prefix>.spans.<service>.
    traced = {"OTEL_SDK_DISABLED": "false", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    _, _, base = await start_gateway(spawn, nats_url, names, router_env=traced, worker_env=traced)
    await deploy_digits(nc, names)
    async with MetricsService(fast, fast_metrics) as metrics:
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
