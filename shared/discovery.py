"""Service discovery with the NATS micro protocol (ADR-32): ``$SRV.PING``, ``$SRV.INFO`` and
``$SRV.STATS``, answered by each instance for all services, its service name and its id.

The replies use the standard JSON schemas, so ``nats micro ls``/``info``/``stats`` and every
client library's service API see aimesh services like any other.  ``aimesh status`` is a client
of the same protocol (:func:`discover`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.clock import rfc3339
from shared.names import micro_subject, micro_subjects
from shared.schemas import (
    ActorStats,
    MicroEndpointInfo,
    MicroEndpointStats,
    MicroInfo,
    MicroPing,
    MicroStats,
)

log = logging.getLogger(__name__)

T = TypeVar("T", MicroPing, MicroInfo, MicroStats)

_json = msgspec.json.Encoder()


class Discovery:
    """Answers the micro protocol for one service instance."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        name: str,
        instance_id: str,
        version: str,
        description: str,
        metadata: Callable[[], dict[str, str]],
        actors: Callable[[], Sequence[ActorStats]],
    ) -> None:
        self._nc = nc
        self.name = name
        self.instance_id = instance_id
        self.version = version
        self.description = description
        self._metadata = metadata
        self._actors = actors
        self.started = datetime.now(UTC)
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        if self._subs:
            return
        handlers = {"PING": self._on_ping, "INFO": self._on_info, "STATS": self._on_stats}
        for verb, subject in micro_subjects(self.name, self.instance_id):
            self._subs.append(await self._nc.subscribe(subject, cb=handlers[verb]))

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("discovery: unsubscribe failed", exc_info=True)

    def ping(self) -> MicroPing:
        return MicroPing(name=self.name, id=self.instance_id, version=self.version, metadata=self._metadata())

    def info(self) -> MicroInfo:
        return MicroInfo(
            name=self.name,
            id=self.instance_id,
            version=self.version,
            description=self.description,
            metadata=self._metadata(),
            endpoints=[
                MicroEndpointInfo(name=a.name, subject=a.subject, queue_group=a.queue_group or "")
                for a in self._actors()
            ],
        )

    def stats(self) -> MicroStats:
        endpoints = []
        for a in self._actors():
            done = max(a.requests - a.in_flight, 0)
            endpoints.append(
                MicroEndpointStats(
                    name=a.name,
                    subject=a.subject,
                    queue_group=a.queue_group or "",
                    num_requests=a.requests,
                    num_errors=a.errors + a.overloaded,
                    last_error=a.last_error,
                    processing_time=a.processing_time_ns,
                    average_processing_time=a.processing_time_ns // done if done else 0,
                    data={
                        "in_flight": a.in_flight,
                        "queued": a.queued,
                        "overloaded": a.overloaded,
                        "unavailable": a.unavailable,
                        "max_concurrency": a.max_concurrency,
                        "mailbox_size": a.mailbox_size,
                        "latency_buckets": a.latency_buckets,
                        **a.extra,
                    },
                )
            )
        return MicroStats(
            name=self.name,
            id=self.instance_id,
            version=self.version,
            started=rfc3339(self.started),
            metadata=self._metadata(),
            endpoints=endpoints,
        )

    async def _on_ping(self, msg: Msg) -> None:
        await self._answer(msg, self.ping())

    async def _on_info(self, msg: Msg) -> None:
        await self._answer(msg, self.info())

    async def _on_stats(self, msg: Msg) -> None:
        await self._answer(msg, self.stats())

    async def _answer(self, msg: Msg, body: msgspec.Struct) -> None:
        if msg.reply:
            await self._nc.publish(msg.reply, _json.encode(body))


async def discover(
    nc: NatsClient,
    verb: str,
    kind: type[T],
    *,
    name: str | None = None,
    wait_s: float = 0.5,
    settle_s: float = 0.15,
) -> list[T]:
    """Send ``$SRV.<verb>[.<name>]`` and gather every reply: until ``settle_s`` passes with no new
    reply after the first, or ``wait_s`` in all.  Replies that do not parse are skipped."""
    inbox = nc.new_inbox()
    replies: list[T] = []
    arrived = asyncio.Event()
    decoder = msgspec.json.Decoder(kind)

    async def collect(msg: Msg) -> None:
        try:
            replies.append(decoder.decode(msg.data))
        except msgspec.DecodeError:
            log.debug("discovery: unparsable %s reply skipped", verb)
        arrived.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(micro_subject(verb, name), b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), min(left, settle_s) if replies else left)
            except TimeoutError:
                if replies:
                    break
    finally:
        await sub.unsubscribe()
    return replies
