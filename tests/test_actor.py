"""Actors against a real nats-server: replies, errors, bounds, deadlines, discovery."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from shared.actor import ActorConfig, Call
from shared.client import request
from shared.config import MeshConfig
from shared.discovery import discover
from shared.errors import BadRequest, DeadlineExceeded, InternalError, Overloaded, Unavailable
from shared.names import Header, micro_subject
from shared.schemas import MicroInfo, ServiceStatus, StatusRequest
from shared.service import Service, ServiceState
from tests.apps.echo import EchoReply, EchoRequest
from tests.helpers import eventually


class GatedService(Service):
    """An echo actor whose handlers wait at a gate, so tests control what is in flight."""

    name = "gated"

    def __init__(self, config: MeshConfig, *, max_concurrency: int = 64, mailbox_size: int = 256) -> None:
        super().__init__(config)
        self.gate = asyncio.Event()
        self.running = 0
        self.max_running = 0
        self.entered = asyncio.Condition()
        self._limits = (max_concurrency, mailbox_size)

    async def setup(self) -> None:
        self.actor = self.add_actor(
            ActorConfig(
                name="echo",
                subject=self.names.endpoint("gated", "echo"),
                max_concurrency=self._limits[0],
                mailbox_size=self._limits[1],
            ),
            self.echo,
            EchoRequest,
        )

    async def echo(self, req: EchoRequest, _: Call) -> EchoReply:
        if req.text == "boom":
            raise RuntimeError("secret internal detail")
        if req.text == "bad":
            raise BadRequest("text must not be 'bad'")
        if req.text == "nojs":  # a JetStream domain no server runs: what a bus without JetStream answers
            await self.nc.jetstream(domain="absent", timeout=1).stream_info("ANY")
        async with self.entered:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.entered.notify_all()
        try:
            if req.text.startswith("wait"):
                await self.gate.wait()
            return EchoReply(text=req.text, instance=self.instance_id)
        finally:
            self.running -= 1

    async def wait_running(self, n: int) -> None:
        async with self.entered:
            await asyncio.wait_for(self.entered.wait_for(lambda: self.running >= n), 10)

    @property
    def subject(self) -> str:
        return self.names.endpoint("gated", "echo")


def _fire(nc: NatsClient, svc: GatedService, texts: list[str]) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(request(nc, svc.subject, EchoRequest(text=t), EchoReply, timeout_s=10)) for t in texts]


async def test_request_reply_through_an_actor(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config) as svc:
        reply = await request(nc, svc.subject, EchoRequest(text="hello"), EchoReply)
        assert reply == EchoReply(text="hello", instance=svc.instance_id)
        assert svc.actor.requests == 1 and svc.actor.errors == 0


async def test_undecodable_payload_gets_an_error_reply_and_the_actor_lives_on(
    mesh_config: MeshConfig, nc: NatsClient
) -> None:
    async with GatedService(mesh_config) as svc:
        reply = await nc.request(svc.subject, b"\xc1not msgpack", timeout=5)
        assert reply.headers is not None
        assert reply.headers[Header.ERROR_CODE] == "400"
        assert "cannot decode" in reply.headers[Header.ERROR]
        # Valid msgpack of the wrong shape is a 400 too, naming the field.
        wrong = msgspec.msgpack.encode({"text": 5})
        with pytest.raises(BadRequest, match=r"text"):
            await request(nc, svc.subject, msgspec.Raw(wrong), EchoReply)
        assert (await request(nc, svc.subject, EchoRequest(text="still here"), EchoReply)).text == "still here"
        assert svc.actor.errors == 2


async def test_handler_exception_is_a_500_without_details_and_the_actor_lives_on(
    mesh_config: MeshConfig, nc: NatsClient
) -> None:
    async with GatedService(mesh_config) as svc:
        with pytest.raises(InternalError, match="internal error") as info:
            await request(nc, svc.subject, EchoRequest(text="boom"), EchoReply)
        assert "secret" not in info.value.description
        with pytest.raises(BadRequest, match="must not be 'bad'"):
            await request(nc, svc.subject, EchoRequest(text="bad"), EchoReply)
        assert (await request(nc, svc.subject, EchoRequest(text="ok"), EchoReply)).text == "ok"
        assert svc.actor.stats().last_error.startswith("400")


async def test_jetstream_unavailable_is_a_503_to_retry_counted_and_logged_once(
    mesh_config: MeshConfig, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with GatedService(mesh_config) as svc:
        for _ in range(3):
            with pytest.raises(Unavailable, match=r"echo: JetStream cannot serve this now \(.+\); retry"):
                await request(nc, svc.subject, EchoRequest(text="nojs"), EchoReply)
        assert (svc.actor.unavailable, svc.actor.errors) == (3, 3)
        assert svc.actor.stats().last_error.startswith("503")
        lines = [r for r in caplog.records if "JetStream cannot serve" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelname == "WARNING" and lines[0].exc_info is None
        # A bug is still a 500 with its traceback in the log.
        with pytest.raises(InternalError):
            await request(nc, svc.subject, EchoRequest(text="boom"), EchoReply)
        assert svc.actor.unavailable == 3


async def test_concurrency_bound_is_honoured(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config, max_concurrency=3, mailbox_size=100) as svc:
        tasks = _fire(nc, svc, [f"wait{i}" for i in range(10)])
        await svc.wait_running(3)
        # Every message has arrived once 3 run and 7 wait; nothing beyond the bound runs.
        await eventually(lambda: asyncio.sleep(0, svc.actor.stats().queued >= 7), 10, "7 messages queued")
        stats = svc.actor.stats()
        assert (stats.in_flight, stats.queued, svc.running) == (3, 7, 3)
        svc.gate.set()
        replies = await asyncio.gather(*tasks)
        assert sorted(r.text for r in replies) == sorted(f"wait{i}" for i in range(10))
        assert svc.max_running == 3


async def test_full_mailbox_answers_overloaded_with_the_numbers(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config, max_concurrency=1, mailbox_size=2) as svc:
        accepted = _fire(nc, svc, ["wait0"])
        await svc.wait_running(1)
        accepted += _fire(nc, svc, ["wait1", "wait2"])
        await eventually(lambda: asyncio.sleep(0, svc.actor.stats().queued >= 2), 10, "2 messages queued")
        with pytest.raises(Overloaded, match=r"1 running, limit 1; 2 queued, limit 2"):
            await request(nc, svc.subject, EchoRequest(text="one too many"), EchoReply)
        svc.gate.set()
        assert [r.text for r in await asyncio.gather(*accepted)] == ["wait0", "wait1", "wait2"]
        assert svc.actor.overloaded == 1


async def test_expired_deadline_is_refused_without_running(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config) as svc:
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await request(nc, svc.subject, EchoRequest(text="late"), EchoReply, headers={Header.DEADLINE: "1000"})
        assert svc.max_running == 0


async def test_no_responders_is_unavailable(mesh_config: MeshConfig, nc: NatsClient) -> None:
    with pytest.raises(Unavailable, match="is it running"):
        await request(nc, f"{mesh_config.prefix}.nobody.home", EchoRequest(text="x"), EchoReply)


async def test_status_endpoint_reports_actors(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config) as svc:
        await request(nc, svc.subject, EchoRequest(text="one"), EchoReply)
        status = await request(nc, svc.names.service_status("gated"), StatusRequest(), ServiceStatus)
        assert status.state == "ready" and status.instance_id == svc.instance_id
        echo = next(a for a in status.actors if a.name == "echo")
        assert echo.requests == 1 and echo.queue_group == svc.names.queue_group("gated")
        # An empty body means an all-defaults request, so `nats req <subject> ""` works.
        raw = await nc.request(svc.names.service_status("gated"), b"", timeout=5)
        assert msgspec.msgpack.decode(raw.data, type=ServiceStatus).name == "gated"


async def test_discovery_speaks_the_micro_protocol(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with GatedService(mesh_config) as svc:
        await request(nc, svc.subject, EchoRequest(text="one"), EchoReply)
        name = svc.names.micro_name("gated")
        # nats-py's own micro implementation parses our replies: standard tooling sees us.
        ping = ServicePing.from_dict(msgspec.json.decode((await nc.request(micro_subject("PING", name), b"")).data))
        info = ServiceInfo.from_dict(msgspec.json.decode((await nc.request(micro_subject("INFO", name), b"")).data))
        stats = ServiceStats.from_dict(
            msgspec.json.decode((await nc.request(micro_subject("STATS", name, svc.instance_id), b"")).data)
        )
        assert ping.id == info.id == stats.id == svc.instance_id
        assert {e.name for e in info.endpoints} == {"status", "echo"}
        echo = next(e for e in stats.endpoints if e.name == "echo")
        assert echo.num_requests == 1 and echo.average_processing_time > 0
        # The all-services subject finds it among whatever else runs on this server.
        assert any(i.id == svc.instance_id for i in await discover(nc, "INFO", MicroInfo))


async def test_drain_finishes_in_flight_requests(mesh_config: MeshConfig, nc: NatsClient) -> None:
    svc = GatedService(mesh_config, max_concurrency=2)
    await svc.start()
    tasks = _fire(nc, svc, ["wait0", "wait1", "wait2"])
    await svc.wait_running(2)
    drain = asyncio.create_task(svc.drain())
    await eventually(lambda: asyncio.sleep(0, svc.state is ServiceState.DRAINING), 10, "the service to drain")
    svc.gate.set()
    await drain
    assert sorted(r.text for r in await asyncio.gather(*tasks)) == ["wait0", "wait1", "wait2"]
    assert svc.state is ServiceState.STOPPED
