"""Every wire schema of the mesh.

Mesh messages are ``msgspec.Struct`` (frozen, keyword-only) encoded as MessagePack.  Rules for
evolving them (see docs/architecture.md): new fields get defaults, a field's type never changes,
payloads a service only forwards stay ``msgspec.Raw``.

The NATS micro protocol (ADR-32) replies are JSON with the exact field names of the standard,
so ``nats micro`` and every client library's service API read them.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every mesh message (MessagePack on the wire)."""


# -- service control ---------------------------------------------------------------------------


class StatusRequest(Message, frozen=True, kw_only=True):
    """Ask one instance of a service for its status (the reply is a ServiceStatus)."""


class ActorStats(Message, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str | None
    requests: int
    errors: int
    overloaded: int
    in_flight: int
    queued: int
    max_concurrency: int
    mailbox_size: int
    processing_time_ns: int
    last_error: str = ""
    # Cumulative counts per bound of shared.histogram.LATENCY_BOUNDS_S, then +Inf.
    latency_buckets: list[int] = []


class ServiceStatus(Message, frozen=True, kw_only=True):
    name: str
    instance_id: str
    version: str
    state: str
    pid: int
    host: str
    started_at: str  # RFC 3339
    uptime_s: float
    actors: list[ActorStats]


# -- tensors -----------------------------------------------------------------------------------


class Tensor(Message, frozen=True, kw_only=True):
    """A dense tensor: dtype name (numpy spelling), shape, little-endian C-order bytes."""

    dtype: str
    shape: list[int]
    data: bytes


# -- NATS micro protocol (JSON, ADR-32) -----------------------------------------------------------

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


class MicroEndpointInfo(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    queue_group: str = ""
    metadata: dict[str, str] = {}


class MicroEndpointStats(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    queue_group: str = ""
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, summed
    average_processing_time: int = 0  # nanoseconds
    data: dict[str, Any] | None = None


class MicroPing(msgspec.Struct, kw_only=True):
    type: str = PING_TYPE
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}


class MicroInfo(msgspec.Struct, kw_only=True):
    type: str = INFO_TYPE
    name: str
    id: str
    version: str
    description: str = ""
    metadata: dict[str, str] = {}
    endpoints: list[MicroEndpointInfo] = []


class MicroStats(msgspec.Struct, kw_only=True):
    type: str = STATS_TYPE
    name: str
    id: str
    version: str
    started: str  # RFC 3339, UTC
    metadata: dict[str, str] = {}
    endpoints: list[MicroEndpointStats] = []
