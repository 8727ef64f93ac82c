"""Durable inference requests: at-least-once through JetStream, exactly one answer per request id.

- A request is published to the ``<PREFIX>_REQUESTS`` work queue on
  ``<prefix>.jobs.<model>.<version>`` with ``Nats-Msg-Id`` = its id (a retry by the caller is
  deduplicated), and a ``pending`` result is recorded.
- A worker acks it only after storing its result on ``<prefix>.results.<id>`` (stream
  ``<PREFIX>_RESULTS``, one message kept per subject, the result's own ``Nats-Msg-Id`` making a
  redelivered request's second answer a no-op).  A worker killed mid-request leaves the message
  unacked; after the ack wait another worker serves it.
- The caller fetches the latest message of its result subject: ``pending``, ``done`` or ``error``.
"""

from __future__ import annotations

import re
import uuid

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.errors import BadRequest, NotFound
from shared.names import Header, Names
from shared.schemas import DurableResult, InferRequest

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_result = msgspec.msgpack.Decoder(DurableResult)
RESULT_TTL_S = 24 * 3600


def request_id(given: str | None) -> str:
    if not given:
        return uuid.uuid4().hex
    if not _ID.match(given):
        raise BadRequest(f"request id {given!r} must be 1–128 letters, digits, '-' or '_'")
    return given


def stream_configs(names: Names) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=names.requests_stream,
            subjects=[names.durable_subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=600,
        ),
        StreamConfig(
            name=names.results_stream,
            subjects=[names.result_subjects],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_age=RESULT_TTL_S,
            duplicate_window=600,
        ),
    ]


async def submit(js: JetStreamContext, names: Names, model: str, version: str, req: InferRequest) -> str:
    """Queue a durable request; returns its id.  Submitting the same id again changes nothing."""
    rid = request_id(req.id)
    req = msgspec.structs.replace(req, id=rid)
    pending = DurableResult(id=rid, state="pending", model=model, version=version)
    await js.publish(names.result(rid), msgspec.msgpack.encode(pending), headers={Header.MSG_ID: f"{rid}/accepted"})
    await js.publish(names.durable_request(model, version), msgspec.msgpack.encode(req), headers={Header.MSG_ID: rid})
    return rid


async def store_result(js: JetStreamContext, names: Names, result: DurableResult) -> None:
    await js.publish(
        names.result(result.id), msgspec.msgpack.encode(result), headers={Header.MSG_ID: f"{result.id}/result"}
    )


async def fetch(js: JetStreamContext, names: Names, rid: str) -> DurableResult:
    request_id(rid)
    try:
        msg = await js.get_last_msg(names.results_stream, names.result(rid))
    except NotFoundError:
        raise NotFound(f"no durable request {rid!r} (results are kept {RESULT_TTL_S // 3600} h)") from None
    return _result.decode(msg.data or b"")
