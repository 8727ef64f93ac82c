"""Several metrics instances with autoscaling on: one lease in the experiments bucket lets exactly
one of them scale a pool; another takes over when it is released, or no longer renewed.

Nothing here depends on the machine's speed: a holder renews between every two looks of the
other process (however long apart they are), and the lease periods are long against the tick
(0.2 s) and the renewals, so a loaded machine cannot expire a live holder's lease."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from services.metrics.service import MetricsService
from shared.config import AutoscaleConfig, MeshConfig, MetricsConfig
from shared.kv import Lease
from shared.names import Names
from shared.schemas import ScaleDecision
from tests.helpers import eventually

TTL_S = 1.0  # the expiry test's lease: its holder renews between every two looks, whatever their pace
AUTOSCALE_LEASE_S = 30.0  # metrics instances: 150 ticks per lease period; handover by release only


async def test_a_lease_has_one_holder_and_passes_on_release_or_expiry(nc: NatsClient, names: Names) -> None:
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{names.prefix}-lease-test"))
    a, b = Lease(kv, "lease.x", "a", ttl_s=TTL_S), Lease(kv, "lease.x", "b", ttl_s=TTL_S)
    assert await a.hold() and a.held
    # b looks, a renews, over more than two lease periods: b sees a new revision at every look,
    # so it never takes the lease, however long a look or a renewal takes.
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 2 * TTL_S:
        assert not await b.hold() and not b.held
        await asyncio.sleep(TTL_S / 4)
        assert await a.hold() and a.held

    # Looks with no renewal between them do not take it either before the ttl: shown with a lease
    # of a minute, which no run of this test lasts.
    c, d = Lease(kv, "lease.y", "c", ttl_s=60), Lease(kv, "lease.y", "d", ttl_s=60)
    assert await c.hold()
    for _ in range(3):
        assert not await d.hold() and not d.held

    # a stalls (a crash, a pause): b takes over once a's revision has not moved for the ttl.
    assert await eventually(b.hold, 10 * TTL_S, "b to take the lease a stopped renewing")
    assert not await a.hold() and not a.held  # a, back, finds b's id and stands down
    assert await b.hold()

    await b.release()  # a graceful stop: a takes it at its next call, without waiting
    assert not b.held and await a.hold()
    await a.release()
    await a.release()  # twice is harmless


@pytest.fixture
def autoscaling() -> AutoscaleConfig:
    return AutoscaleConfig(enabled=True, warmup_s=0, lease_s=AUTOSCALE_LEASE_S)


def ticks(service: MetricsService) -> int:
    """Ticks the service has run: each adds a point to the dashboard's replicas series."""
    return len(service.history.snapshot().get("replicas", {}).get(service.autoscale_config.pool, []))


async def test_one_of_two_metrics_instances_scales_the_pool_and_the_other_takes_over(
    fast: MeshConfig, fast_metrics: MetricsConfig, autoscaling: AutoscaleConfig, nc: NatsClient, names: Names
) -> None:
    decisions: list[ScaleDecision] = []

    async def record(msg: Msg) -> None:
        decisions.append(msgspec.msgpack.decode(msg.data, type=ScaleDecision))

    sub = await nc.subscribe(names.scale("inference"), cb=record)
    services = [MetricsService(fast, fast_metrics, autoscaling), MetricsService(fast, fast_metrics, autoscaling)]
    try:
        for service in services:
            await service.start()

        async def decided(since: int = 0, by: str | None = None) -> bool:
            return any(by in (None, d.by) for d in decisions[since:])

        async def leads(service: MetricsService) -> bool:
            return service.autoscale_lease.held

        await eventually(decided, 15, "a scale decision")
        leader, follower = services if services[0].autoscale_lease.held else services[::-1]
        # The follower tries the lease at each of its ticks: ten more, and it still stays quiet.
        seen = ticks(follower)

        async def ten_more() -> bool:
            return ticks(follower) >= seen + 10

        await eventually(ten_more, 30, "ten more ticks of the follower")
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
        await eventually(lambda: leads(follower), 15, "the follower to take the lease")
        await eventually(lambda: decided(seen, follower.instance_id), 15, "a decision by the new leader")
    finally:
        for service in services:
            await service.drain()
        await sub.unsubscribe()
