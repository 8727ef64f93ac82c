"""The metrics service's Prometheus endpoint, fed by the mesh's discovery statistics."""

from __future__ import annotations

import re

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.prometheus import render
from services.metrics.service import MetricsService
from shared.client import request
from shared.config import MeshConfig
from shared.schemas import MicroEndpointStats, MicroStats
from tests.apps.echo import EchoReply, EchoRequest, EchoService
from tests.helpers import eventually


async def test_metrics_endpoint_counts_requests_per_instance(
    mesh_config: MeshConfig, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIMESH_METRICS_PORT", "0")
    monkeypatch.setenv("AIMESH_METRICS_SCRAPE_INTERVAL_S", "0.2")
    async with EchoService(mesh_config) as echo, MetricsService(mesh_config) as metrics:
        for i in range(3):
            await request(nc, echo.names.endpoint("echo", "echo"), EchoRequest(text=str(i)), EchoReply)
        series = f'aimesh_requests_total{{service="echo",instance="{echo.instance_id}",endpoint="echo"}} 3'

        async with aiohttp.ClientSession() as http:

            async def scraped() -> str | None:
                async with http.get(f"{metrics.http_url}/metrics") as resp:
                    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    text = await resp.text()
                return text if series in text else None

            text = await eventually(scraped, 10, "the echo requests to show up")
        assert f'aimesh_up{{service="metrics",instance="{metrics.instance_id}"}} 1' in text
        labels = f'service="echo",instance="{echo.instance_id}",endpoint="echo"'
        count = re.search(rf"aimesh_request_duration_seconds_count{{{labels}}} (\d+)", text)
        assert count and count.group(1) == "3"


def test_render_escapes_labels_and_skips_malformed_histograms() -> None:
    snap = MicroStats(
        name="m-echo",
        id="ID",
        version="0.1.0",
        started="2026-01-01T00:00:00.000Z",
        metadata={"service": 'we"ird'},
        endpoints=[MicroEndpointStats(name="e", subject="s", num_requests=2, data={"latency_buckets": [1]})],
    )
    text = render([snap])
    assert 'aimesh_requests_total{service="we\\"ird",instance="ID",endpoint="e"} 2' in text
    assert "aimesh_request_duration_seconds_bucket" not in text


def test_batching_counters_become_prometheus_series() -> None:
    snap = MicroStats(
        name="m-inference",
        id="W1",
        version="0.1.0",
        started="2026-01-01T00:00:00.000Z",
        metadata={"service": "inference"},
        endpoints=[
            MicroEndpointStats(
                name="infer-digits-1",
                subject="s",
                num_requests=11,
                data={
                    "batches": 3,
                    "batch_rows": 11,
                    "batch_reasons": {"free": 2, "full": 1},
                    "batch_sizes": {"1": 2, "9": 1},
                },
            )
        ],
    )
    text = render([snap])
    labels = 'service="inference",instance="W1",endpoint="infer-digits-1"'
    assert f'aimesh_batches_total{{{labels},reason="full"}} 1' in text
    assert f"aimesh_batch_rows_total{{{labels}}} 11" in text
    assert f'aimesh_batch_size_bucket{{{labels},le="8"}} 2' in text
    assert f'aimesh_batch_size_bucket{{{labels},le="16"}} 3' in text
    assert f"aimesh_batch_size_sum{{{labels}}} 11" in text
