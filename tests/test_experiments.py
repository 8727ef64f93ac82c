"""Experiments end to end: real worker and router processes, two real model versions, requests and
feedback over HTTP and NATS, the metrics service's verdict written to the split (or only reported),
its state rebuilt from JetStream after a restart, feedback counted once per idempotency key and
rewarded once per request id, and feedback refused with 503 while NATS is away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec
import nats
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.service import MetricsService
from shared.client import request
from shared.config import MeshConfig, MetricsConfig
from shared.errors import MeshTimeout, Unavailable
from shared.events import publish_feedback
from shared.names import Names, split_key
from shared.natsserver import NatsServer
from shared.schemas import (
    Deployment,
    DeployRequest,
    ExperimentDecision,
    ExperimentQuery,
    ExperimentReport,
    Exposure,
    ExposureBatch,
    Feedback,
    Guardrails,
    Split,
    Variant,
)
from tests.helpers import ServiceProcess, eventually, free_port, holds
from tests.mesh import deploy_digits, put_split, register_mlp, report_of, report_when, serving, start_gateway

pytestmark = pytest.mark.slow

X = np.random.default_rng(0).random((1, 64), dtype=np.float32)
BODY = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": X[0].tolist()}]}


async def two_versions(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> tuple[ServiceProcess, str]:
    _, router, base = await start_gateway(spawn, nats_url, names)
    for seed in (1, 2):
        await register_mlp(nc, names, seed=seed)
    for ref in ("1", "2"):
        await request(nc, names.deploy, DeployRequest(model="digits", ref=ref), Deployment)
    await eventually(lambda: serving(nc, names, "digits@2"), 60, "digits@1 and @2 to be served")
    await eventually(lambda: serving(nc, names, "digits@1"), 60, "digits@1 to be served")
    return router, base


async def wait_ticks(metrics: MetricsService, n: int) -> None:
    """Until ``n`` ticks of ``metrics`` have started after this call: ticks run one after the
    other, so every tick that was running when it was called, and ``n - 1`` more, have finished.
    Each tick adds a point to the dashboard's replicas series, stamped when it starts."""
    since = time.time()
    pool = metrics.autoscale_config.pool

    async def ticked() -> bool:
        points = metrics.history.snapshot().get("replicas", {}).get(pool, [])
        return sum(ts > since for ts, _ in points) >= n

    await eventually(ticked, 10 + n, f"{n} ticks of the metrics service")


async def first_decision(nc: NatsClient, names: Names) -> ExperimentDecision:
    sub = await nc.jetstream().subscribe(names.experiment_events("digits"), ordered_consumer=True)
    try:
        return msgspec.msgpack.decode((await sub.next_msg(timeout=5)).data, type=ExperimentDecision)
    finally:
        await sub.unsubscribe()


async def traffic(
    http: aiohttp.ClientSession, base: str, n: int, rewards: dict[str, float], rng: random.Random
) -> dict[str, int]:
    """``n`` requests through the gateway, each followed by Bernoulli feedback with the served
    variant's chance; returns requests per variant."""
    served: dict[str, int] = {}

    async def one() -> None:
        async with http.post(f"{base}/v2/models/digits/infer", json=BODY) as resp:
            assert resp.status == 200, await resp.text()
            out = await resp.json()
            variant = resp.headers["Aimesh-Variant"]
            assert resp.headers["Aimesh-Request-Id"] == out["id"] and out["id"]
        served[variant] = served.get(variant, 0) + 1
        reward = 1.0 if rng.random() < rewards[variant] else 0.0
        async with http.post(f"{base}/v1/feedback", json={"id": out["id"], "model": "digits", "reward": reward}) as fb:
            assert fb.status == 202, await fb.text()

    for _ in range(n // 50):
        await asyncio.gather(*(one() for _ in range(50)))
    return served


@pytest.mark.timeout(600)  # up to 3,000 requests on two CPU workers, then a restart
async def test_a_better_candidate_is_promoted_and_the_state_survives_a_restart(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    _, base = await two_versions(spawn, nats_url, names, nc)
    metrics = MetricsService(fast, fast_metrics)
    await metrics.start()
    try:
        split = await put_split(
            http,
            base,
            {
                "model": "digits",
                "variants": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "control": "1",
                "guardrails": {"min_samples": 60, "min_requests": 20, "alpha": 0.05},
            },
        )
        assert split.experiment and split.state == "running"
        rng = random.Random(3)
        sent = 0

        async def promoted() -> ExperimentReport | None:
            return await report_when(nc, names, lambda r: r.verdict == "promoted")

        report: ExperimentReport | None = None
        while report is None and sent < 3000:
            await traffic(http, base, 200, {"1": 0.2, "2": 0.6}, rng)
            sent += 200
            try:
                report = await eventually(promoted, 2, "a verdict")
            except AssertionError:
                report = None
        assert report is not None, f"no promotion after {sent} requests: {await report_of(nc, names)}"
        assert (report.winner, report.state) == ("2", "promoted")
        by = {v.version: v for v in report.variants}
        assert by["2"].reward_mean > by["1"].reward_mean and by["2"].p_value <= 0.05
        assert by["1"].rewards >= 60 and by["2"].rewards >= 60

        # The split now sends everything to v2, written by the metrics service.
        kv = await nc.jetstream().key_value(names.experiments_bucket)
        stored = msgspec.json.decode((await kv.get("split.digits")).value or b"", type=Split)
        assert stored.state == "promoted" and [(v.version, v.weight) for v in stored.variants] == [("2", 100.0)]
        assert stored.experiment == split.experiment
        # ... and the decision is an event with its evidence.
        decision = await first_decision(nc, names)
        assert (decision.action, decision.version, decision.candidate) == ("promote", "2", "2")
        assert decision.evidence.variants and decision.reason
        # The gateway follows: v2 serves everything.
        assert (await traffic(http, base, 50, {"1": 0.0, "2": 0.0}, rng)).keys() == {"2"}
        sent += 50

        # The HTTP API of the metrics service says the same.
        async with http.get(f"{metrics.http_url}/api/experiments/digits") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["verdict"] == "promoted"
        # Once every request's exposure and feedback is counted, a restart must give the same.
        settled = await eventually(
            lambda: report_when(
                nc, names, lambda r: sum(v.requests for v in r.variants) == sum(v.rewards for v in r.variants) == sent
            ),
            20,
            f"all {sent} requests and their feedback to be counted",
        )
        before = {v.version: (v.requests, v.rewards) for v in settled.variants}
    finally:
        await metrics.drain()

    # A new metrics service rebuilds the same statistics from the events stream.
    again = MetricsService(fast, fast_metrics)
    await again.start()
    try:

        async def rebuilt() -> ExperimentReport | None:
            return await report_when(
                nc, names, lambda r: {v.version: (v.requests, v.rewards) for v in r.variants} == before
            )

        report = await eventually(rebuilt, 20, f"the restarted metrics service to count {before}")
        assert report.verdict == "promoted"
    finally:
        await again.drain()


@pytest.mark.timeout(240)
async def test_a_candidate_over_its_latency_guardrail_is_rolled_back(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    _, base = await two_versions(spawn, nats_url, names, nc)
    js = nc.jetstream()
    async with MetricsService(fast, fast_metrics) as metrics:
        # The events stream stops taking decisions (exposures and feedback still go in), so the
        # decision's first publish fails after its write to the split.
        events = (await js.stream_info(names.events_stream)).config
        narrowed = [f"{names.prefix}.events.exposures.>", f"{names.prefix}.feedback.*"]
        await js.update_stream(dataclasses.replace(events, subjects=narrowed))
        await put_split(
            http,
            base,
            {
                "model": "digits",
                "variants": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "control": "1",
                # No real request takes under 10 µs over HTTP and NATS: v2 must break this.
                "guardrails": {"max_p99_ms": 0.01, "min_requests": 20},
            },
        )
        await traffic(http, base, 100, {"1": 0.5, "2": 0.5}, random.Random(1))

        async def rolled_back() -> ExperimentReport | None:
            return await report_when(nc, names, lambda r: r.verdict == "rolled_back")

        await eventually(rolled_back, 15, "the rollback")
        await wait_ticks(metrics, 5)  # five ticks of retries that cannot succeed
        assert [e.experiment for e in metrics.pending_decision_events] == [(await report_of(nc, names)).experiment]
        # The stream takes decisions again: the queued event is stored at the next tick.
        await js.update_stream(events)
        decision = await first_decision(nc, names)
        # The stream holds the event a moment before the service reads its ack and dequeues it.
        await eventually(lambda: holds(not metrics.pending_decision_events), 5, "the queue emptied")
        assert (decision.action, decision.version, decision.candidate) == ("rollback", "1", "2")
        assert "p99" in decision.reason and "guardrail" in decision.reason
        kv = await nc.jetstream().key_value(names.experiments_bucket)
        stored = msgspec.json.decode((await kv.get("split.digits")).value or b"", type=Split)
        assert stored.state == "rolled_back" and [v.version for v in stored.variants] == ["1"]


@pytest.mark.timeout(240)
async def test_feedback_errors_nats_feedback_and_serving_without_metrics(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    _, base = await two_versions(spawn, nats_url, names, nc)
    for bad, why in (
        ({"model": "digits"}, "invalid feedback"),
        ({"id": "r1", "model": "digits", "reward": "lots"}, "invalid feedback"),
        ({"id": "has space", "model": "digits"}, "request id"),
    ):
        async with http.post(f"{base}/v1/feedback", json=bad) as resp:
            assert resp.status == 400 and why in (await resp.json())["error"]
    async with http.post(f"{base}/v1/feedback", data=b'{"id": "r1", "model": "digits", "reward": NaN}') as resp:
        assert resp.status == 400
    async with http.post(f"{base}/v1/feedback", json={"id": "r1", "model": "nope"}) as resp:
        assert resp.status == 404 and "not deployed" in (await resp.json())["error"]

    # With no metrics service running, the gateway serves and feedback is still stored.
    await put_split(
        http,
        base,
        {
            "model": "digits",
            "variants": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
            "guardrails": {"min_samples": 1000},
        },
    )
    with pytest.raises((Unavailable, MeshTimeout), match=r"no service answers|timed out"):
        await request(nc, names.experiments_query, ExperimentQuery(model="digits"), ExperimentReport, timeout_s=1)
    served = await traffic(http, base, 100, {"1": 1.0, "2": 0.0}, random.Random(2))
    # NATS programs publish feedback too (JSON here; MessagePack works the same), plus garbage.
    await nc.jetstream().publish(names.feedback("digits"), json.dumps({"id": "nats-1", "variant": "2"}).encode())
    await nc.publish(names.feedback("digits"), b"\x01garbage")
    await nc.flush()

    async with MetricsService(fast, fast_metrics) as metrics:

        def all_in(report: ExperimentReport) -> bool:
            by = {v.version: v for v in report.variants}
            got = {k: by[k].requests for k in served if k in by}
            return got == served and sum(v.rewards for v in by.values()) == 101

        async def counted() -> ExperimentReport | None:
            return await report_when(nc, names, all_in)

        report = await eventually(counted, 60, f"the stored requests {served} and 101 rewards")
        assert report.verdict == "waiting"
        by = {v.version: v for v in report.variants}
        assert by["1"].reward_mean == 1.0 and by["1"].rewards == served["1"]
        assert metrics.rejected["feedback"] >= 1


async def test_report_only_reports_the_winner_and_never_changes_the_split(
    nc: NatsClient, names: Names, fast: MeshConfig, fast_metrics: MetricsConfig, http: aiohttp.ClientSession
) -> None:
    js = nc.jetstream()
    async with MetricsService(fast, fast_metrics) as metrics:
        kv = await js.key_value(names.experiments_bucket)
        split = Split(
            model="digits",
            variants=[Variant(version="1", weight=50), Variant(version="2", weight=50)],
            control="1",
            guardrails=Guardrails(min_samples=40, min_requests=1, auto=False),  # --report-only
            experiment="reportonly01",
        )
        revision = await kv.put(split_key("digits"), msgspec.json.encode(split))
        # The events stream as routers and callers fill it: v2 converts 90%, v1 10%.
        rng = random.Random(4)
        served = [
            Exposure(
                id=f"r{i}",
                model="digits",
                variant="12"[i % 2],
                experiment=split.experiment,
                latency_s=0.002,
                ts=time.time(),
            )
            for i in range(200)
        ]
        await js.publish(names.exposures("digits"), msgspec.msgpack.encode(ExposureBatch(router="t", exposures=served)))
        for e in served:
            won = rng.random() < (0.9 if e.variant == "2" else 0.1)
            await publish_feedback(js, names, Feedback(id=e.id, model="digits", reward=float(won)))

        async def verdict() -> ExperimentReport | None:
            return await report_when(
                nc, names, lambda r: r.verdict == "promote" and sum(v.rewards for v in r.variants) == 200
            )

        report = await eventually(verdict, 20, "all 200 rewards and the verdict promote")
        assert (report.winner, report.state) == ("2", "running")
        await wait_ticks(metrics, 2)  # a tick has judged it with the verdict in hand, and acted or not

        # Reported everywhere ...
        async with http.get(f"{metrics.http_url}/api/experiments/digits") as resp:
            assert (await resp.json())["verdict"] == "promote"
        async with http.get(f"{metrics.http_url}/metrics") as resp:
            assert 'aimesh_experiment_rewards{model="digits",variant="2"} 100' in await resp.text()
        # ... and nothing changed: the split is the one written, no decision was made or published.
        entry = await kv.get(split_key("digits"))
        assert entry.revision == revision and msgspec.json.decode(entry.value or b"", type=Split) == split
        assert not metrics.decisions and not metrics.pending_decision_events
        stored = await js.stream_info(names.events_stream, subjects_filter=names.experiment_events("digits"))
        assert not stored.state.subjects


async def test_feedback_counts_once_per_idempotency_key_and_once_per_request(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    _, _, base = await start_gateway(spawn, nats_url, names)
    await deploy_digits(nc, names)
    await put_split(http, base, {"model": "digits", "variants": [{"version": "1", "weight": 100}]})
    async with MetricsService(fast, fast_metrics) as metrics:
        ids = []
        for _ in range(2):
            async with http.post(f"{base}/v2/models/digits/infer", json=BODY) as resp:
                assert resp.status == 200, await resp.text()
                ids.append(resp.headers["Aimesh-Request-Id"])
        first, second = ids

        async def exposed() -> ExperimentReport | None:
            return await report_when(nc, names, lambda r: sum(v.requests for v in r.variants) == 2)

        await eventually(exposed, 20, "both exposures at the metrics service")

        async def send(request_id: str, reward: float, key: str | None) -> None:
            headers = {"Idempotency-Key": key} if key else {}
            body = {"id": request_id, "model": "digits", "reward": reward}
            async with http.post(f"{base}/v1/feedback", json=body, headers=headers) as resp:
                assert resp.status == 202, await resp.text()

        await send(first, 1.0, "order-7-paid")
        await send(first, 0.0, "order-7-paid")  # a retry: the stream drops it
        await send(first, 0.0, "order-7-refunded")  # stored, but the request has its reward
        await send(second, 0.0, None)

        info = await nc.jetstream().stream_info(names.events_stream, subjects_filter=names.feedback("digits"))
        assert info.state.subjects == {names.feedback("digits"): 3}

        async def all_read() -> ExperimentReport | None:
            # every stored outcome is either a reward or a duplicate once the service has read it
            return await report_when(
                nc, names, lambda r: sum(v.rewards for v in r.variants) + metrics.book.duplicates >= 3
            )

        report = await eventually(all_read, 20, "the three stored outcomes to be read")
        (v1,) = report.variants
        assert (v1.requests, v1.rewards, v1.reward_mean, metrics.book.duplicates) == (2, 2, 0.5, 1)


@pytest.mark.timeout(180)
async def test_feedback_answers_503_while_nats_is_away_and_its_retry_is_stored_once(
    spawn: Callable[..., ServiceProcess], names: Names, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # A server of its own: this test stops it.
    server = NatsServer(store_dir=tmp_path / "store", port=free_port(), http_port=None)
    server.start()
    try:
        router = spawn("services.router", url=server.url, AIMESH_ROUTER_PORT="0")
        base = (await router.wait_ready(server.url, names.micro_name("router"))).metadata["http"]
        nc = await nats.connect(server.url)
        try:
            await register_mlp(nc, names, seed=1)  # a split needs a registered version, not a worker
        finally:
            await nc.close()
        await put_split(http, base, {"model": "digits", "variants": [{"version": "1", "weight": 100}]})

        async def feedback(request_id: str, key: str) -> tuple[int, str]:
            body = {"id": request_id, "model": "digits", "reward": 1}
            async with http.post(f"{base}/v1/feedback", json=body, headers={"Idempotency-Key": key}) as resp:
                return resp.status, await resp.text()

        assert (await feedback("req-1", "k1"))[0] == 202

        server.stop()
        status, text = await feedback("req-2", "k2")
        assert status == 503 and "feedback not stored" in json.loads(text)["error"], (status, text)

        server.start()  # same port, same store

        async def stored() -> bool:
            status, text = await feedback("req-2", "k2")  # the retry the 503 asks for, with the same key
            assert status in (202, 503), (status, text)  # 503 only until the router has reconnected
            return status == 202

        await eventually(stored, 30, "the retried feedback to be stored")
        nc = await nats.connect(server.url)
        try:
            # Once each, whether or not the refused publish went out when the router reconnected.
            info = await nc.jetstream().stream_info(names.events_stream, subjects_filter=names.feedback("digits"))
            assert info.state.subjects == {names.feedback("digits"): 2}
        finally:
            await nc.close()
    finally:
        server.stop()
