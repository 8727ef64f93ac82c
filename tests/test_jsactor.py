"""JetStream actors: ack after work, progress on long work, dead letters with the reason."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js.api import RetentionPolicy, StreamConfig

from shared.actor import Call
from shared.config import MeshConfig
from shared.errors import Unavailable
from shared.jsactor import DLQ_CODE, DLQ_DELIVERIES, DLQ_REASON, DLQ_SUBJECT, JetStreamActorConfig
from shared.service import Service
from tests.apps.echo import EchoRequest
from tests.helpers import eventually, holds


class WorkService(Service):
    name = "work"

    def __init__(self, config: MeshConfig, *, ack_wait_s: float = 30.0) -> None:
        super().__init__(config)
        self.calls: dict[str, int] = {}
        self.done: list[str] = []
        self.deliveries: dict[str, int] = {}
        self.ack_wait_s = ack_wait_s

    @property
    def stream(self) -> str:
        return f"{self.names.prefix.upper()}_WORK"

    @property
    def subject(self) -> str:
        return f"{self.names.prefix}.work.items"

    async def setup(self) -> None:
        await self.ensure_dead_letter_stream()
        await self.ensure_stream(
            StreamConfig(name=self.stream, subjects=[self.subject], retention=RetentionPolicy.WORK_QUEUE)
        )
        self.actor = self.add_jetstream_actor(
            JetStreamActorConfig(
                name="items",
                stream=self.stream,
                subject=self.subject,
                durable="items",
                max_deliver=3,
                ack_wait_s=self.ack_wait_s,
                retry_backoff_s=0.05,
                max_concurrency=4,
            ),
            self.handle,
            EchoRequest,
        )

    async def handle(self, req: EchoRequest, call: Call) -> None:
        self.calls[req.text] = self.calls.get(req.text, 0) + 1
        self.deliveries[req.text] = call.msg.metadata.num_delivered or 0
        if req.text == "always-fails":
            raise RuntimeError("cannot do it")
        if req.text == "bus-trouble" and self.calls[req.text] <= 3:
            raise Unavailable("the results stream is electing a leader", retry_after_s=0.05)
        if req.text == "bus-trouble" and self.calls[req.text] == 4:  # JetStream itself answering no one
            await self.nc.jetstream(domain="absent", timeout=1).stream_info("ANY")
        if req.delay_s:
            await asyncio.sleep(req.delay_s)
        self.done.append(req.text)


async def _dead_letters(nc: NatsClient, svc: WorkService, n: int) -> list[object]:
    js = nc.jetstream()
    sub = await js.pull_subscribe(svc.names.dead_letter("items"), stream=svc.names.dead_letter_stream)
    got: list[object] = []
    try:
        while len(got) < n:  # fetch returns what is there; dead letters arrive over time
            got += await sub.fetch(n - len(got), timeout=10)
        return got
    finally:
        await sub.unsubscribe()


async def test_messages_are_acked_after_the_work(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with WorkService(mesh_config) as svc:
        js = nc.jetstream()
        for i in range(20):
            await js.publish(svc.subject, msgspec.msgpack.encode(EchoRequest(text=f"m{i}")))

        async def all_done() -> bool:
            info = await js.consumer_info(svc.stream, "items")
            return len(svc.done) == 20 and info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(all_done, 10, "20 messages processed and acked")
        assert sorted(svc.done) == sorted(f"m{i}" for i in range(20))
        # Work-queue retention: acked messages leave the stream.
        assert (await js.stream_info(svc.stream)).state.messages == 0


async def test_failing_message_is_dead_lettered_after_max_deliver(mesh_config: MeshConfig, nc: NatsClient) -> None:
    async with WorkService(mesh_config) as svc:
        js = nc.jetstream()
        await js.publish(svc.subject, msgspec.msgpack.encode(EchoRequest(text="always-fails")))
        await js.publish(svc.subject, b"\xc1 not msgpack")
        await js.publish(svc.subject, msgspec.msgpack.encode(EchoRequest(text="fine")))
        dead = await _dead_letters(nc, svc, 2)
        by_code = {m.headers[DLQ_CODE]: m for m in dead}  # type: ignore[attr-defined]
        failed, undecodable = by_code["500"], by_code["400"]
        assert failed.headers[DLQ_DELIVERIES] == "3"  # type: ignore[attr-defined]
        assert "failed 3 times" in failed.headers[DLQ_REASON]  # type: ignore[attr-defined]
        assert failed.headers[DLQ_SUBJECT] == svc.subject  # type: ignore[attr-defined]
        assert "cannot decode" in undecodable.headers[DLQ_REASON]  # type: ignore[attr-defined]
        assert undecodable.data == b"\xc1 not msgpack"  # type: ignore[attr-defined]
        assert svc.calls["always-fails"] == 3 and svc.done == ["fine"]
        assert svc.actor.dead_lettered == 2


async def test_a_handler_meeting_jetstream_unavailable_runs_again_on_the_same_delivery(
    mesh_config: MeshConfig, nc: NatsClient
) -> None:
    """Four 503s in a row, more than max_deliver (3): the message is neither nak'ed nor
    dead-lettered, the handler runs again after the pause each 503 asks for, and then succeeds."""
    async with WorkService(mesh_config) as svc:
        await nc.jetstream().publish(svc.subject, msgspec.msgpack.encode(EchoRequest(text="bus-trouble")))
        await eventually(lambda: holds(svc.done == ["bus-trouble"]), 20, "the message done after the bus's trouble")
        assert svc.calls["bus-trouble"] == 5 and svc.deliveries["bus-trouble"] == 1
        assert (svc.actor.unavailable_retries, svc.actor.unavailable, svc.actor.dead_lettered) == (4, 4, 0)
        assert svc.actor.stats().extra == {"dead_lettered": 0, "unavailable_retries": 4, "unsettled": 0}


async def test_long_work_is_not_redelivered(mesh_config: MeshConfig, nc: NatsClient) -> None:
    # The handler takes 2.5× the ack wait; in_progress() keeps the server from redelivering.
    async with WorkService(mesh_config, ack_wait_s=1.0) as svc:
        js = nc.jetstream()
        await js.publish(svc.subject, msgspec.msgpack.encode(EchoRequest(text="slow", delay_s=2.5)))
        await eventually(lambda: _done(svc), 10, "the slow message to finish")
        info = await js.consumer_info(svc.stream, "items")
        assert svc.calls["slow"] == 1
        assert info.num_redelivered == 0


async def _done(svc: WorkService) -> bool:
    return bool(svc.done)
