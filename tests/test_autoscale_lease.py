"""Several metrics instances with autoscaling on: one lease in the experiments bucket lets exactly
one of them scale a pool; another takes over when it is released, or no longer renewed."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from services.metrics.service import MetricsService
from shared.config import MeshConfig
from shared.kv import Lease
from shared.names import Names
from shared.schemas import ScaleDecision
from tests.helpers import eventually


async def test_a_lease_has_one_holder_and_passes_on_release_or_expiry(nc: NatsClient, names: Names) -> None:
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{names.prefix}-lease-test"))
    a, b = Lease(kv, "lease.x", "a", ttl_s=0.6), Lease(kv, "lease.x", "b", ttl_s=0.6)
    assert await a.hold() and a.held
    for _ in range(5):  # a renews more often than the ttl: b never takes it
        assert not await b.hold() and not b.held
        await asyncio.sleep(0.2)
        assert await a.hold()

    # a stalls (a crash, a pause): b takes over once a's revision has not moved for the ttl.
    assert await eventually(b.hold, 5, "b to take the lease a stopped renewing")
    assert not await a.hold() and not a.held  # a, back, finds b's id and stands down
    assert await b.hold()

    await b.release()  # a graceful stop: a takes it at its next call, without waiting
    assert not b.held and await a.hold()
    await a.release()
    await a.release()  # twice is harmless


@pytest.fixture
def autoscaling(fast: MeshConfig, monkeypatch: pytest.MonkeyPatch) -> MeshConfig:
    monkeypatch.setenv("AIMESH_AUTOSCALE_ENABLED", "true")
    monkeypatch.setenv("AIMESH_AUTOSCALE_WARMUP_S", "0")
    monkeypatch.setenv("AIMESH_AUTOSCALE_LEASE_S", "1")
    return fast


async def test_one_of_two_metrics_instances_scales_the_pool_and_the_other_takes_over(
    autoscaling: MeshConfig, nc: NatsClient, names: Names
) -> None:
    decisions: list[ScaleDecision] = []

    async def record(msg: Msg) -> None:
        decisions.append(msgspec.msgpack.decode(msg.data, type=ScaleDecision))

    sub = await nc.subscribe(names.scale("inference"), cb=record)
    services = [MetricsService(autoscaling), MetricsService(autoscaling)]
    try:
        for service in services:
            await service.start()

        async def decided(since: int = 0, by: str | None = None) -> bool:
            return any(by in (None, d.by) for d in decisions[since:])

        async def leads(service: MetricsService) -> bool:
            return service.autoscale_lease.held

        await eventually(decided, 15, "a scale decision")
        leader, follower = services if services[0].autoscale_lease.held else services[::-1]
        await asyncio.sleep(2.5)  # over two lease periods, ~12 ticks: the follower stays quiet
        assert {d.by for d in decisions} == {leader.instance_id}
        assert leader.autoscale_lease.held and not follower.autoscale_lease.held

        # The follower shows the leader's decision (dashboard, aimesh_replicas_desired); one that
        # started after it sees the next, as decisions are repeated every 5 s.
        async def shown() -> bool:
            return "inference" in follower.scale and follower.scale["inference"].by == leader.instance_id

        await eventually(shown, 10, "the leader's decision at the follower")
        assert not follower.rejected

        seen = len(decisions)
        await leader.drain()  # releases the lease: the follower takes it at its next tick
        await eventually(lambda: leads(follower), 5, "the follower to take the lease")
        await eventually(lambda: decided(seen, follower.instance_id), 10, "a decision by the new leader")
    finally:
        for service in services:
            await service.drain()
        await sub.unsubscribe()
