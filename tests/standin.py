"""A stand-in inference worker: a responder on one version's subject, on the real nats-server.

Tests of the router use it where they must see what reaches a worker (the deadline header, which
requests a mirror received), or must hold a request in flight for as long as they like; the
router under test is always a real process.  It answers like a worker (``InferReply``) with
logits all equal to ``value``, so an answer it gave is recognisable wherever it ends up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import msgspec
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.schemas import InferReply, InferRequest
from shared.tensors import to_wire

_request = msgspec.msgpack.Decoder(InferRequest)


@dataclass(frozen=True)
class Received:
    id: str
    headers: dict[str, str]
    at_ms: float  # wall clock on arrival, in ms since the epoch (as the deadline header)


class StandIn:
    def __init__(self, nc: NatsClient, subject: str, version: str, *, value: float = 0.0, hold: bool = False) -> None:
        self.nc = nc
        self.subject = subject
        self.version = version
        self.value = value
        self.received: list[Received] = []
        self.arrived = asyncio.Event()  # set by the first request
        self.release = asyncio.Event()  # answers wait for it (``hold=True``); set at once otherwise
        if not hold:
            self.release.set()
        self._sub: Subscription | None = None

    async def __aenter__(self) -> StandIn:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_request)
        await self.nc.flush()  # subscribed on the server before anyone sends
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release.set()
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        req = _request.decode(msg.data)
        self.received.append(Received(req.id, dict(msg.headers or {}), time.time() * 1000))
        self.arrived.set()
        await self.release.wait()
        rows = next(iter(req.inputs.values())).shape[0] if req.inputs else 1
        logits = np.full((rows, 10), self.value, dtype=np.float32)
        reply = InferReply(
            outputs={"logits": to_wire(logits)},
            model=self.subject.split(".")[-2],
            version=self.version,
            id=req.id,
            batch_size=rows,
        )
        if msg.reply:
            await msg.respond(msgspec.msgpack.encode(reply))
