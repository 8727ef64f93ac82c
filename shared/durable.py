"""Durable inference requests: at-least-once through JetStream, exactly one answer per request id.

- A request is accepted only for a deployed model version (404 otherwise, 400 for a name that is
  not a subject token): nothing would ever serve it, and it would wait in the stream until it
  expired.  The router checks against its routing table; other callers' deployments are read
  from the deployments bucket.
- It is published to the ``<PREFIX>_REQUESTS`` work queue on ``<prefix>.jobs.<model>.<version>``
  with ``Nats-Msg-Id`` = its id (a retry by the caller is deduplicated).  The stream is bounded
  (:class:`~shared.config.DurableConfig`) and refuses new requests when full (discard policy
  ``new``): the submitter gets :class:`~shared.errors.Overloaded` with the numbers, and nothing
  accepted is dropped for room.  Then a ``pending`` result is recorded, unless a result is
  already there (a resubmitted id, or a worker faster than us): it never hides an answer.
- A worker acks it only after storing its result on ``<prefix>.results.<id>`` (stream
  ``<PREFIX>_RESULTS``, one message kept per subject, bounded in age and bytes, oldest dropped
  first; the result's own ``Nats-Msg-Id`` making a redelivered request's second answer a
  no-op).  A worker killed mid-request leaves the message unacked; after the ack wait another
  worker serves it.
- The caller fetches the latest message of its result subject: ``pending``, ``done`` or ``error``.
- Sizes: a request over the bus's ``max_payload`` (read from the server at connect) or over what
  the requests stream holds is refused with :class:`~shared.errors.PayloadTooLarge` (413) and
  nothing is stored.  Each stream's ``max_msg_size`` is its ``max_bytes`` (or the bus's hard
  limit, whichever is smaller), so a message it could never hold is refused, not stored and
  dropped at once.  A result too large to store is stored as an ``error`` result with code 413.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from shared import transient
from shared.client import message_size, too_large
from shared.config import NATS_MAX_PAYLOAD_LIMIT, DurableConfig
from shared.errors import BadRequest, NotFound, Overloaded, PayloadTooLarge, Unavailable
from shared.kv import open_bucket
from shared.names import Header, Names, check_token
from shared.schemas import Deployment, DurableResult, InferRequest

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_result = msgspec.msgpack.Decoder(DurableResult)
_deployment = msgspec.json.Decoder(Deployment)
RESULT_TTL_S = 24 * 3600  # the default of DurableConfig.results_max_age_s
# JetStream: Nats-Expected-Last-Subject-Sequence did not hold (10164 is what a clustered stream
# answers, seen while a stream's replicas catch up after a partition).
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
_MESSAGE_TOO_LARGE = 10054  # JetStream: the message is over the stream's max_msg_size
_EXPECTED_LAST_SUBJECT_SEQUENCE = Header.EXPECTED_LAST_SUBJECT_SEQUENCE


def request_id(given: str | None) -> str:
    if not given:
        return uuid.uuid4().hex
    if not _ID.match(given):
        raise BadRequest(f"request id {given!r} must be 1–128 letters, digits, '-' or '_'")
    return given


def stream_configs(names: Names, config: DurableConfig) -> list[StreamConfig]:
    """The requests and results streams.  Every service that declares them (the router, the
    inference workers) must pass the same ``config``: the last one to start wins."""
    return [
        StreamConfig(
            name=names.requests_stream,
            subjects=[names.durable_subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_msgs=config.requests_max_msgs,
            max_bytes=config.requests_max_bytes,
            max_age=config.requests_max_age_s,
            max_msg_size=largest_message(config.requests_max_bytes),
            discard=DiscardPolicy.NEW,
            duplicate_window=600,
        ),
        StreamConfig(
            name=names.results_stream,
            subjects=[names.result_subjects],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_bytes=config.results_max_bytes,
            max_age=config.results_max_age_s,
            max_msg_size=largest_message(config.results_max_bytes),
            discard=DiscardPolicy.OLD,
            duplicate_window=600,
        ),
    ]


def largest_message(max_bytes: int) -> int:
    """A stream's ``max_msg_size``: what its ``max_bytes`` can hold.  Without it a results stream
    (discard policy ``old``) would accept a result larger than itself and drop it at once, and
    the request would look pending forever."""
    if max_bytes <= 0:  # unlimited
        return NATS_MAX_PAYLOAD_LIMIT
    return min(max_bytes, NATS_MAX_PAYLOAD_LIMIT)


def check_names(model: str, version: str | None = None) -> None:
    """400 unless the model and version (when given) are subject tokens: no dots, wildcards or
    spaces, which would name other subjects or none."""
    try:
        check_token(model, "model")
        if version is not None:
            check_token(version, "version")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def check_deployed(deployments: Iterable[Deployment], model: str, version: str) -> None:
    """404 unless some deployment of ``model`` serves ``version`` now: a request for anything
    else would wait in the stream with no worker to take it."""
    check_names(model, version)
    served = sorted({d.version for d in deployments if d.model == model}, key=_version_order)
    if version in served:
        return
    if not served:
        raise NotFound(f"model {model!r} is not deployed (aimesh deploy {model})")
    raise NotFound(
        f"version {version!r} of model {model!r} is not deployed (deployed: {', '.join(served)}; "
        f"aimesh deploy {model}@{version})"
    )


def _version_order(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


async def read_deployments(js: JetStreamContext, names: Names, model: str, timeout_s: float = 5.0) -> list[Deployment]:
    """The model's deployment records, read from the deployments bucket (``model`` must be a
    token: it goes into the subject filter).

    Read with a pull consumer, not a key watcher: a pull consumer delivers nothing until asked,
    so its pending count is exact, whereas a watcher's "initial values done" marker can arrive
    before a value already on its way (and the model would look undeployed)."""
    check_token(model, "model")
    bucket = names.deployments_bucket
    if await open_bucket(js, bucket) is None:
        return []
    stream = f"KV_{bucket}"  # the standard key/value layout (ADR-8): stream KV_<b>, subjects $KV.<b>.<key>
    config = ConsumerConfig(
        name=f"deployments-{uuid.uuid4().hex}",
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(timeout_s, 5.0),  # removed by the server if we cannot delete it
        mem_storage=True,
    )
    sub = await js.pull_subscribe(f"$KV.{bucket}.deploy.{model}.*", stream=stream, config=config)
    found: list[Deployment] = []
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending:
            for msg in await sub.fetch(min(pending, 256), timeout=timeout_s):
                pending = msg.metadata.num_pending
                if msg.data:  # a deleted key's marker has none
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        found.append(_deployment.decode(msg.data))
    except TimeoutError:  # nats' own TimeoutError subclasses it too
        raise Unavailable(f"the deployments bucket did not answer within {timeout_s:g}s") from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            await js.delete_consumer(stream, str(config.name))
    return found


async def submit(
    js: JetStreamContext,
    names: Names,
    model: str,
    version: str,
    req: InferRequest,
    *,
    deployments: Iterable[Deployment] | None = None,
) -> str:
    """Queue a durable request; returns its id.  Submitting the same id again changes nothing.

    Raises :class:`BadRequest` for a model, version or id that is not a token,
    :class:`NotFound` when ``model@version`` is not deployed (checked against ``deployments``
    when given, else the deployments bucket), :class:`Overloaded` when the requests stream is
    full.  Nothing is stored in any of these cases."""
    check_names(model, version)
    rid = request_id(req.id)
    if deployments is None:
        deployments = await read_deployments(js, names, model)
    check_deployed(deployments, model, version)
    req = msgspec.structs.replace(req, id=rid)
    body, headers = msgspec.msgpack.encode(req), {Header.MSG_ID: rid}
    what = f"the durable request {rid!r} for {model}@{version}"
    size = message_size(body, headers)
    limit = _bus_limit(js)
    if size > limit:
        raise too_large(what, size, limit)
    await _store_request(js, names, names.durable_request(model, version), body, headers, what, rid)
    await _mark_pending(js, names, DurableResult(id=rid, state="pending", model=model, version=version), what)
    return rid


async def _store_request(
    js: JetStreamContext, names: Names, subject: str, body: bytes, headers: dict[str, str], what: str, rid: str
) -> None:
    try:
        await js.publish(subject, body, headers=headers)
    except APIError as exc:
        if exc.err_code == _MESSAGE_TOO_LARGE:
            size = message_size(body, headers)
            raise await _over_stream(js, names.requests_stream, what, size, "requests_max_bytes") from None
        if exc.err_code == transient.STREAM_FULL:  # also a 503 from JetStream, but a full queue: 429
            raise Overloaded(await _full_reason(js, names, exc), retry_after_s=5.0) from None
        if transient.jetstream_not_now(exc):  # no leader, no quorum, stream offline: JetStream's own state
            raise _not_now(what, rid, exc) from None
        raise
    except _NOT_NOW as exc:
        raise _not_now(what, rid, exc) from None


async def _mark_pending(js: JetStreamContext, names: Names, pending: DurableResult, what: str) -> None:
    """Only onto an empty subject: a result already there (a resubmitted id, or a worker that
    answered first) stays the answer."""
    try:
        await js.publish(
            names.result(pending.id),
            msgspec.msgpack.encode(pending),
            headers={Header.MSG_ID: f"{pending.id}/accepted", _EXPECTED_LAST_SUBJECT_SEQUENCE: "0"},
        )
    except APIError as exc:
        if exc.err_code in _WRONG_LAST_SEQUENCE:
            return
        if transient.jetstream_not_now(exc):  # stored, not yet marked pending: a retry does it
            raise _not_now(what, pending.id, exc) from None
        raise
    except _NOT_NOW as exc:
        raise _not_now(what, pending.id, exc) from None


# JetStream cannot store now (no stream leader: an election after a server left, a stream
# that answers no one yet; no answer in time; and any 5xx JetStream error but a full stream).
# Not the request's fault, and retrying the same id is safe: the stream's Msg-Id window stores
# it once.
_NOT_NOW = (NoStreamResponseError, TimeoutError)


def _not_now(what: str, rid: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"{what} could not be stored now (JetStream: {transient.reason(exc)}): retry with the same id, "
        f"{rid!r}, which is stored once however often it is sent",
        retry_after_s=transient.RETRY_AFTER_S,
    )


async def _full_reason(js: JetStreamContext, names: Names, exc: APIError) -> str:
    """Why the requests stream refused a request, with its numbers when they can be read."""
    reason = f"durable request queue {names.requests_stream} is full ({exc.description})"
    with contextlib.suppress(Exception):
        info = await js.stream_info(names.requests_stream)
        cfg, state = info.config, info.state
        reason += (
            f": {state.messages} requests waiting (limit {cfg.max_msgs}), {state.bytes} bytes (limit {cfg.max_bytes})"
        )
    return (
        f"{reason}; nothing was queued: retry later, add inference workers, "
        "or raise [durable] requests_max_msgs / requests_max_bytes"
    )


def _bus_limit(js: JetStreamContext) -> int:
    # nats-py keeps the server's max_payload (from its INFO) on the connection under the context.
    return int(js._nc.max_payload)


async def _over_stream(js: JetStreamContext, stream: str, what: str, size: int, setting: str) -> PayloadTooLarge:
    """413 for a message over what ``stream`` holds, with its limit when it can be read."""
    limit = ""
    with contextlib.suppress(Exception):
        limit = f" of {(await js.stream_info(stream)).config.max_msg_size} bytes"
    return PayloadTooLarge(
        f"{what} is {size} bytes encoded, over the largest message stream {stream} holds{limit}: "
        f"send less, or raise [durable] {setting}"
    )


async def store_result(js: JetStreamContext, names: Names, result: DurableResult) -> None:
    """Store ``result``; one too large for the bus or the results stream is stored as an error
    result (413) instead, so its request is answered, never left pending."""
    subject, headers = names.result(result.id), {Header.MSG_ID: f"{result.id}/result"}
    body = msgspec.msgpack.encode(result)
    size = message_size(body, headers)
    limit = _bus_limit(js)
    err: PayloadTooLarge | None = None
    if size > limit:
        err = too_large(f"the output of durable request {result.id!r}", size, limit)
    else:
        try:
            await js.publish(subject, body, headers=headers)
            return
        except APIError as exc:
            if exc.err_code != _MESSAGE_TOO_LARGE:
                raise
            what = f"the output of durable request {result.id!r}"
            err = await _over_stream(js, names.results_stream, what, size, "results_max_bytes")
    refused = msgspec.structs.replace(result, state="error", outputs={}, error=err.description, code=err.code)
    await js.publish(subject, msgspec.msgpack.encode(refused), headers=headers)


async def fetch(js: JetStreamContext, names: Names, rid: str, *, kept_s: float = RESULT_TTL_S) -> DurableResult:
    """The latest result of request ``rid``; ``kept_s`` (the results stream's age limit) only
    words the 404."""
    request_id(rid)
    try:
        msg = await js.get_last_msg(names.results_stream, names.result(rid))
    except NotFoundError:
        raise NotFound(f"no durable request {rid!r} (results are kept {kept_s / 3600:g} h)") from None
    return _result.decode(msg.data or b"")
