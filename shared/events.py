"""The events stream (``<PREFIX>_EVENTS``): exposures, feedback and experiment decisions.

It is the experiments' state: the metrics service rebuilds every experiment's statistics by
replaying it, so a restarted (or second) metrics service loses nothing and agrees with the
first.  Feedback published by any NATS client on ``<prefix>.feedback.<model>`` lands here too
(JetStream captures the subject), acknowledged when a reply subject is given.
"""

from __future__ import annotations

import math

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from shared.errors import BadRequest, Unavailable
from shared.names import Header, Names, check_token
from shared.schemas import Feedback

EVENTS_MAX_AGE_S = 30 * 24 * 3600
EVENTS_MAX_BYTES = 1 << 30

_msgpack = msgspec.msgpack.Decoder(Feedback)
_json = msgspec.json.Decoder(Feedback)


def stream_config(names: Names) -> StreamConfig:
    return StreamConfig(
        name=names.events_stream,
        subjects=names.events_stream_subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENTS_MAX_AGE_S,
        max_bytes=EVENTS_MAX_BYTES,
        duplicate_window=600,
    )


def decode_feedback(data: bytes, subject_model: str) -> Feedback:
    """A feedback message in MessagePack or JSON; a BadRequest saying what is wrong otherwise."""
    try:
        fb = _json.decode(data) if data.lstrip()[:1] == b"{" else _msgpack.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"invalid feedback: {exc}") from None
    return check_feedback(fb if fb.model else msgspec.structs.replace(fb, model=subject_model))


def check_feedback(fb: Feedback) -> Feedback:
    try:
        check_token(fb.model, "model name")
    except ValueError as exc:
        raise BadRequest(f"invalid feedback: {exc}") from None
    check_request_id(fb.id)
    if not math.isfinite(fb.reward):
        raise BadRequest(f"invalid feedback: reward must be a finite number, not {fb.reward}")
    return fb


def check_request_id(request_id: str) -> str:
    """A request id as feedback and exposures carry it: 1–256 characters, none of them blank or
    control characters (OIP lets callers choose their ids, so dots and colons are fine)."""
    if not request_id or len(request_id) > 256 or any(c.isspace() or not c.isprintable() for c in request_id):
        raise BadRequest(
            f"invalid feedback: request id {request_id[:64]!r} must be 1–256 printable characters without spaces"
        )
    return request_id


async def publish_feedback(
    js: JetStreamContext, names: Names, fb: Feedback, idempotency_key: str | None = None
) -> None:
    """Store one outcome; returns once JetStream has it (an idempotency key dedupes retries)."""
    headers = {Header.MSG_ID: f"feedback:{idempotency_key}"} if idempotency_key else None
    try:
        await js.publish(names.feedback(fb.model), msgspec.msgpack.encode(fb), headers=headers)
    except Exception as exc:  # JetStream away or slow: not stored, so the caller must retry
        raise Unavailable(
            f"feedback not stored ({type(exc).__name__}): retry it, with the same Idempotency-Key "
            "so that it counts once"
        ) from None
