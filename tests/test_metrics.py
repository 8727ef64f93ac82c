"""The metrics service: metric snapshots from every service into Prometheus series, queue lag,
training progress, bad input counted and dropped, rates for the dashboard and the autoscaler."""

from __future__ import annotations

import re

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.prometheus import MeshView, QueueLag, render
from services.metrics.rates import Rates
from services.metrics.service import MetricsService
from shared import durable
from shared.client import request
from shared.config import MeshConfig, MetricsConfig, load_durable_config
from shared.histogram import LatencyHistogram
from shared.schemas import (
    ActorStats,
    GpuStats,
    MetricsSnapshot,
    ProcessStats,
    RouteStats,
    TrainJob,
    TrainProgress,
    TrainRequest,
)
from tests.apps.echo import EchoReply, EchoRequest, EchoService
from tests.helpers import eventually


async def scrape_until(http: aiohttp.ClientSession, url: str, *needles: str) -> str:
    async def scraped() -> str | None:
        async with http.get(f"{url}/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        return text if all(n in text for n in needles) else None

    return await eventually(scraped, 15, f"{needles} in /metrics")


async def test_metrics_endpoint_counts_requests_per_instance(
    fast: MeshConfig, fast_metrics: MetricsConfig, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    async with EchoService(fast) as echo, MetricsService(fast, fast_metrics) as metrics:
        for i in range(3):
            await request(nc, echo.names.endpoint("echo", "echo"), EchoRequest(text=str(i)), EchoReply)
        series = f'aimesh_requests_total{{service="echo",instance="{echo.instance_id}",endpoint="echo"}} 3'
        text = await scrape_until(http, metrics.http_url, series)
        assert f'aimesh_up{{service="metrics",instance="{metrics.instance_id}"}} 1' in text
        labels = f'service="echo",instance="{echo.instance_id}",endpoint="echo"'
        count = re.search(rf"aimesh_request_duration_seconds_count{{{labels}}} (\d+)", text)
        assert count and count.group(1) == "3"
        instance = f'service="echo",instance="{echo.instance_id}"'
        rss = re.search(rf"aimesh_process_resident_memory_bytes{{{instance}}} (\d+)", text)
        assert rss and int(rss.group(1)) > 10_000_000  # a real process's resident memory
        assert f'aimesh_process_cpu_seconds_total{{service="echo",instance="{echo.instance_id}"}}' in text


async def test_malformed_snapshots_are_counted_and_the_service_lives_on(
    fast: MeshConfig, fast_metrics: MetricsConfig, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    async with EchoService(fast) as echo, MetricsService(fast, fast_metrics) as metrics:
        await nc.publish(echo.names.metrics("echo", "bogus"), b"\x93not a snapshot")
        await nc.publish(echo.names.metrics("echo", "bogus"), b"")
        await nc.publish(echo.names.spans("echo"), b"{}")
        await scrape_until(http, metrics.http_url, 'aimesh_rejected_total{kind="snapshot"} 2')
        # ... and real snapshots still count.
        await scrape_until(
            http, metrics.http_url, 'aimesh_rejected_total{kind="spans"} 1', f'instance="{echo.instance_id}"'
        )


async def test_queue_lag_and_training_progress_become_series(
    fast: MeshConfig, fast_metrics: MetricsConfig, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    async with MetricsService(fast, fast_metrics) as metrics:
        names = metrics.names
        js = nc.jetstream()
        for config in durable.stream_configs(names, load_durable_config()):
            await js.add_stream(config)
        subject = names.durable_request("m", "1")
        sub = await js.pull_subscribe(subject, durable="infer-m-1", stream=names.requests_stream)
        for i in range(5):
            await js.publish(names.durable_request("m", "1"), str(i).encode())
        await sub.fetch(2)  # delivered, not acked: ack pending
        lag = f'aimesh_queue_lag{{stream="{names.requests_stream}",consumer="infer-m-1"}} 5'
        text = await scrape_until(http, metrics.http_url, lag)
        assert f'aimesh_queue_ack_pending{{stream="{names.requests_stream}",consumer="infer-m-1"}} 2' in text

        jobs = await js.key_value(names.jobs_bucket)
        req = TrainRequest(model="digits", factory="zoo.classifier:mlp", dataset="digits@1")
        await jobs.put("job.j1", msgspec.json.encode(TrainJob(job_id="j1", request=req, state="running")))
        progress = TrainProgress(
            job_id="j1", attempt=1, world=2, epoch=1, step=40, steps_per_epoch=20, loss=0.25, samples_per_s=1234.5
        )
        await jobs.put("progress.j1", msgspec.json.encode(progress))
        text = await scrape_until(http, metrics.http_url, 'aimesh_train_loss{job="j1",model="digits"} 0.25')
        assert 'aimesh_train_samples_per_second{job="j1",model="digits"} 1234.5' in text


def _snapshot(instance: str, ts: float, requests: int, latencies_ms: list[float], **kw: object) -> MetricsSnapshot:
    hist = LatencyHistogram()
    for ms in latencies_ms:
        hist.observe_ns(int(ms * 1e6))
    route = RouteStats(
        model="digits",
        version="2",
        requests=requests,
        errors={"503": 1} if requests > 10 else {},
        latency_buckets=hist.cumulative(),
        latency_sum_s=sum(latencies_ms) / 1000,
    )
    return MetricsSnapshot(
        service=str(kw.get("service", "router")),
        instance=instance,
        host="h",
        pid=1,
        ts=ts,
        interval_s=1.0,
        process=ProcessStats(cpu_s=1.5, rss_bytes=1000),
        routes=[route],
        gpus=[GpuStats(index=0, utilization=0.5, memory_used_bytes=7)],
    )


def test_render_gateway_gpu_and_label_escaping() -> None:
    snap = _snapshot("R1", 100.0, 12, [1.0, 2.0])
    actor = ActorStats(
        name="infer-digits-2",
        subject="s",
        queue_group=None,
        requests=4,
        errors=0,
        overloaded=0,
        in_flight=1,
        queued=0,
        max_concurrency=8,
        mailbox_size=8,
        processing_time_ns=10,
        labels={"model": 'we"ird', "version": "2"},
        extra={
            "batches": 3,
            "batch_rows": 11,
            "batch_reasons": {"free": 2, "full": 1},
            "batch_sizes": {"1": 2, "9": 1},
        },
    )
    text = render(
        MeshView(
            snapshots=[msgspec.structs.replace(snap, actors=[actor])],
            lags=[QueueLag("S", "c", 3, 1)],
            replicas={"inference": 2},
        )
    )
    assert 'aimesh_gateway_requests_total{instance="R1",model="digits",version="2"} 12' in text
    assert 'aimesh_gateway_errors_total{instance="R1",model="digits",version="2",code="503"} 1' in text
    assert 'aimesh_gateway_request_duration_seconds_count{instance="R1",model="digits",version="2"} 2' in text
    assert 'aimesh_gpu_utilization_ratio{service="router",instance="R1",gpu="0"} 0.5' in text
    labels = 'service="router",instance="R1",endpoint="infer-digits-2",model="we\\"ird",version="2"'
    assert f"aimesh_requests_total{{{labels}}} 4" in text
    assert f'aimesh_batches_total{{{labels},reason="full"}} 1' in text
    assert f'aimesh_batch_size_bucket{{{labels},le="8"}} 2' in text
    assert f"aimesh_batch_size_sum{{{labels}}} 11" in text
    assert 'aimesh_queue_lag{stream="S",consumer="c"} 4' in text
    assert 'aimesh_replicas{pool="inference"} 2' in text
    # Every sample line is NAME{labels} VALUE, and every family is declared once.
    for line in text.splitlines():
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{.*\})? -?[0-9.e+-]+", line), line


def test_rates_from_cumulative_snapshots_survive_restarts_and_expire() -> None:
    rates = Rates()
    rates.add(_snapshot("R1", 100.0, 0, []))
    rates.add(_snapshot("R1", 102.0, 20, [5.0] * 19 + [50.0]))
    window = rates.variants(102.5)["digits@2"]
    assert window.rate == pytest.approx(10.0)
    assert window.error_rate == pytest.approx(1 / 20)
    p50 = window.quantile_ms(0.5)
    assert p50 is not None and 2.5 <= p50 <= 5.0  # within the 2.5–5 ms bucket
    # A restarted router starts its counters again: the new count is the difference.
    rates.add(_snapshot("R1", 104.0, 4, [1.0] * 4))
    assert rates.variants(104.1)["digits@2"].rate == pytest.approx(2.0)
    # Silent for more than three intervals: gone.
    assert rates.variants(120.0) == {}
    assert rates.live(120.0) == []
