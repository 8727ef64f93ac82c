"""The supervisor carries out scale decisions from NATS: real supervisor, real service processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from aimesh.supervisor import STATE_FILE, Supervisor
from shared.config import AutoscaleConfig, UpConfig
from shared.discovery import discover
from shared.names import Names
from shared.schemas import MicroPing, ScaleDecision
from tests.helpers import ROOT, eventually

pytestmark = pytest.mark.slow


def _decision(pool: str, desired: int, current: int) -> bytes:
    return msgspec.msgpack.encode(
        ScaleDecision(pool=pool, desired=desired, current=current, reason=f"test asks for {desired}", ts=0.0)
    )


async def test_supervisor_scales_inference_up_and_down_on_decisions(
    tmp_path: Path, nats_url: str, names: Names, nc: NatsClient
) -> None:
    up = UpConfig(ingest=0, trainer=0, inference=1, router=0, metrics=0, data_dir=str(tmp_path / "mesh"))
    child_env = {"AIMESH_PREFIX": names.prefix, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"}
    policy = AutoscaleConfig(enabled=True, min_replicas=0, max_replicas=2)
    supervisor = Supervisor(up, nats_url=nats_url, child_env=child_env, drain_timeout_s=5.0, autoscale=policy)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    subject = names.scale("inference")

    async def ready_pids(count: int) -> set[str] | None:
        if running.done():
            raise AssertionError(f"the supervisor stopped: {running.result()}")
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.5)
        pids = {p.metadata.get("pid", "") for p in pings if p.metadata.get("state") == "ready"}
        return pids if len(pids) == count else None

    def state_replicas() -> dict[str, int]:
        replicas: dict[str, int] = json.loads((Path(up.data_dir) / STATE_FILE).read_text())["replicas"]
        return replicas

    try:
        await asyncio.wait_for(supervisor.following.wait(), 20)
        first = await eventually(lambda: ready_pids(1), 30, "one ready inference instance")
        assert state_replicas() == {"ingest": 0, "trainer": 0, "inference": 1, "router": 0, "metrics": 0}

        await nc.publish(subject, _decision("inference", 2, 1))
        both = await eventually(lambda: ready_pids(2), 30, "two ready inference instances")
        assert first < both
        assert state_replicas()["inference"] == 2

        # Garbage, a pool that is no service, an impossible count, more than the policy's maximum
        # and a pool that is not autoscaled: counted, skipped, the supervisor lives on.
        await nc.publish(subject, b"\xc1not msgpack")
        await nc.publish(names.scale("nosuch"), _decision("nosuch", 1, 0))
        await nc.publish(subject, _decision("inference", -1, 2))
        await nc.publish(subject, _decision("inference", 3, 2))
        await nc.publish(names.scale("router"), _decision("router", 0, 0))
        await nc.publish(subject, _decision("inference", 2, 2))  # a repeat: nothing to do
        await nc.flush()

        async def five_bad() -> bool:
            return supervisor.bad_decisions == 5

        await eventually(five_bad, 10, "five bad decisions counted")
        assert supervisor.replicas("inference") == 2
        assert not running.done()

        await nc.publish(subject, _decision("inference", 0, 2))
        await eventually(lambda: _none_answer(nc, names), 30, "no inference instance to answer")
        retired = [s for s in supervisor.slots if s.service == "inference"]

        async def all_exited() -> bool:
            return all(s.proc is not None and s.proc.returncode is not None for s in retired)

        await eventually(all_exited, 15, "the inference processes to exit")
        assert [s.last_exit for s in retired] == [0, 0]  # drained on SIGTERM, not killed
        assert state_replicas()["inference"] == 0
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 30)
    assert code == 0
    assert not (Path(up.data_dir) / STATE_FILE).exists()


async def _none_answer(nc: NatsClient, names: Names) -> bool:
    return not await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.5)


async def test_supervisor_ignores_scale_decisions_when_autoscaling_is_off(
    tmp_path: Path, nats_url: str, names: Names, nc: NatsClient
) -> None:
    """The attack: a decision for 3 workers published on a mesh started without --autoscale."""
    up = UpConfig(ingest=0, trainer=0, inference=1, router=0, metrics=0, data_dir=str(tmp_path / "mesh"))
    child_env = {"AIMESH_PREFIX": names.prefix, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"}
    supervisor = Supervisor(up, nats_url=nats_url, child_env=child_env, drain_timeout_s=5.0)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    try:
        await asyncio.wait_for(supervisor.started.wait(), 20)
        assert supervisor._nc is None and not supervisor.following.is_set()  # not even subscribed
        await nc.publish(names.scale("inference"), _decision("inference", 3, 1))
        await nc.flush()
        await asyncio.sleep(1.0)  # a decision followed would have added slots by now
        assert supervisor.replicas("inference") == 1
        assert len([s for s in supervisor.slots if s.service == "inference"]) == 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
