"""Autoscaling end to end: the real supervisor, metrics service and inference workers.  An idle
pool goes to zero; durable requests sent to zero workers wait in the stream, bring workers back
(up to the maximum) and are all answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from aimesh.supervisor import Supervisor
from shared import durable
from shared.config import UpConfig, load_autoscale_config
from shared.discovery import discover
from shared.names import Names
from shared.schemas import InferRequest, MicroPing
from shared.tensors import to_wire
from tests.helpers import ROOT, eventually
from tests.mesh import deploy_digits

pytestmark = pytest.mark.slow

POLICY = {
    "AIMESH_AUTOSCALE_ENABLED": "true",
    "AIMESH_AUTOSCALE_MIN_REPLICAS": "0",
    "AIMESH_AUTOSCALE_MAX_REPLICAS": "2",
    "AIMESH_AUTOSCALE_TARGET_LAG": "20",
    "AIMESH_AUTOSCALE_UP_COOLDOWN_S": "1",
    "AIMESH_AUTOSCALE_DOWN_COOLDOWN_S": "3",
    "AIMESH_AUTOSCALE_IDLE_TO_ZERO_S": "4",
    "AIMESH_AUTOSCALE_WARMUP_S": "12",
    "AIMESH_METRICS_TICK_S": "0.5",
    "AIMESH_METRICS_SCRAPE_INTERVAL_S": "0.5",
    "AIMESH_METRICS_INTERVAL_S": "0.5",
    "AIMESH_METRICS_PORT": "0",
}


async def ready_workers(nc: NatsClient, names: Names) -> int:
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.4)
    return sum(p.metadata.get("state") == "ready" for p in pings)


@pytest.mark.timeout(480)  # its waits add up to several minutes on a loaded machine
async def test_idle_pool_scales_to_zero_and_queued_durable_requests_bring_workers_back(
    tmp_path: Path, nats_url: str, names: Names, nc: NatsClient
) -> None:
    up = UpConfig(ingest=0, trainer=0, inference=1, router=0, metrics=1, data_dir=str(tmp_path / "mesh"))
    child_env = {"AIMESH_PREFIX": names.prefix, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true", **POLICY}
    autoscale = load_autoscale_config(env=child_env)
    supervisor = Supervisor(up, nats_url=nats_url, child_env=child_env, drain_timeout_s=5.0, autoscale=autoscale)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    try:
        await asyncio.wait_for(supervisor.following.wait(), 30)

        async def one_ready() -> bool:
            return await ready_workers(nc, names) == 1

        await eventually(one_ready, 60, "the first inference worker")
        await deploy_digits(nc, names)

        # Idle: the pool goes to zero, the worker drained, not killed.
        async def none_ready() -> bool:
            return await ready_workers(nc, names) == 0 and supervisor.replicas("inference") == 0

        await eventually(none_ready, 40, "the idle pool to scale to zero")
        retired = [s for s in supervisor.slots if s.service == "inference" and s.retired]

        async def exited() -> bool:
            return bool(retired) and all(s.last_exit is not None for s in retired)

        await eventually(exited, 20, "the scaled-down worker to exit")
        assert [s.last_exit for s in retired] == [0]  # drained, not killed

        # Durable requests to no worker at all: accepted, waiting in the stream.
        js = nc.jetstream()
        x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        ids = [
            await durable.submit(js, names, "digits", "1", InferRequest(inputs={"x": to_wire(x)}, id=f"q{i}"))
            for i in range(200)
        ]
        seen_max = 0

        async def two_ready() -> bool:
            nonlocal seen_max
            seen_max = max(seen_max, await ready_workers(nc, names))
            return seen_max == 2

        # Lag 200 over a target of 20 per worker asks for 10, capped at the maximum of 2.
        await eventually(two_ready, 90, "two workers started for the queued requests")

        async def all_answered() -> bool:
            results = [await durable.fetch(js, names, rid) for rid in ids]
            return all(r.state == "done" for r in results)

        await eventually(all_answered, 60, "every queued durable request to be answered")

        # And idle again: back to zero.
        await eventually(none_ready, 60, "the pool to scale back to zero")
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 60)
    assert code == 0
