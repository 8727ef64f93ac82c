"""Calling actors: a typed request with trace context, a deadline and typed errors.

Used by services that call other services and by the CLI.  An error reply becomes the same
:class:`~shared.errors.ServiceError` subclass the handler raised; no responders becomes
:class:`~shared.errors.Unavailable` (the request surely never ran, so it is safe to retry); a
timeout becomes :class:`~shared.errors.MeshTimeout` (it may have run).

A message larger than the bus carries (the server's ``max_payload``, which nats-py reads from the
server's INFO at connect) is refused before it is sent, as :class:`~shared.errors.PayloadTooLarge`
(413) with its size and the limit: the server would otherwise close the sender's connection
(headers count against the limit; nats-py checks only the payload).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared import tracing
from shared.config import NATS_MAX_PAYLOAD_LIMIT
from shared.errors import InternalError, MeshTimeout, PayloadTooLarge, Unavailable
from shared.names import Header, Names
from shared.routing import Route
from shared.schemas import GenerateChunk, GenerateRequest, InferReply, InferRequest
from shared.wire import deadline_header, encode, error_in

T = TypeVar("T")

_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return dec


def _decode_reply(decoder: msgspec.msgpack.Decoder[T], data: bytes, subject: str) -> T:
    """A reply as the caller's type; one it cannot take (a value of a closed set this side does
    not know, say: msgspec.ValidationError is a DecodeError) is a clear 500, not a traceback."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InternalError(f"cannot decode the reply from {subject}: {exc}") from None


_HEADER_LINE = len(b"NATS/1.0\r\n")


def message_size(body: bytes, headers: Mapping[str, str] | None = None) -> int:
    """The bytes the server counts against ``max_payload``: the payload and the header block."""
    if not headers:
        return len(body)
    block = _HEADER_LINE + 2 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(body) + block


def too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    """The 413 for ``what`` (a request, an output) of ``size`` bytes over the bus's ``limit``."""
    return PayloadTooLarge(
        f"{what} is {size} bytes encoded, over the bus's max_payload of {limit} bytes: send or ask "
        f"for less (a smaller batch), or raise the NATS server's max_payload ([up] nats_max_payload, "
        f"at most {NATS_MAX_PAYLOAD_LIMIT} bytes)"
    )


def check_fits(nc: NatsClient, what: str, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """:class:`PayloadTooLarge` unless ``body`` with ``headers`` fits the connected server's
    ``max_payload``."""
    size = message_size(body, headers)
    if size > nc.max_payload:
        raise too_large(what, size, nc.max_payload)


async def request(
    nc: NatsClient,
    subject: str,
    payload: Any,
    response_type: type[T],
    *,
    timeout_s: float = 5.0,
    template: str | None = None,
    headers: dict[str, str] | None = None,
) -> T:
    """Send ``payload`` to ``subject`` and decode the reply as ``response_type``."""
    hdrs = dict(headers or {})
    ours = deadline_header(timeout_s)
    theirs = hdrs.get(Header.DEADLINE)
    # Keep an upstream deadline when it is the earlier one: deadlines only shrink downstream.
    hdrs[Header.DEADLINE] = theirs if theirs and theirs.isdigit() and int(theirs) < int(ours) else ours
    body = encode(payload)
    if tracing.tracing_disabled():  # the hot path without a span: no context manager to enter
        reply = await _request_once(nc, subject, body, hdrs, timeout_s)
        err = error_in(reply.headers)
        if err is not None:
            raise err
    else:
        with tracing.send_span(template or subject, subject, hdrs, request=True) as span:
            reply = await _request_once(nc, subject, body, hdrs, timeout_s)
            err = error_in(reply.headers)
            if err is not None:
                tracing.mark_error(span, type(err).__name__, err.description)
                raise err
    if response_type is bytes:
        return reply.data  # type: ignore[return-value]
    return _decode_reply(_decoder(response_type), reply.data, subject)


async def _request_once(nc: NatsClient, subject: str, body: bytes, hdrs: dict[str, str], timeout_s: float) -> Msg:
    """One request/reply, nats-py's failures as the mesh's errors."""
    check_fits(nc, f"the request to {subject}", body, hdrs)
    try:
        return await nc.request(subject, body, timeout=timeout_s, headers=hdrs)
    except MaxPayloadError:  # the server's limit changed since we checked (a reconnect)
        raise too_large(f"the request to {subject}", message_size(body, hdrs), nc.max_payload) from None
    except NoRespondersError:
        raise Unavailable(f"no service answers on {subject}: is it running?") from None
    except (NatsTimeoutError, TimeoutError):
        raise MeshTimeout(subject, timeout_s) from None


async def stream(
    nc: NatsClient,
    subject: str,
    payload: Any,
    chunk_type: type[T],
    *,
    done: Any,
    timeout_s: float = 30.0,
    template: str | None = None,
) -> AsyncIterator[T]:
    """Send one request and yield the stream of replies until ``done(chunk)`` is true.

    Each chunk must arrive within ``timeout_s`` of the previous one.  No subscriber on
    ``subject`` raises :class:`Unavailable` (NATS answers a request with a 503 status).
    """
    import asyncio

    hdrs: dict[str, str] = {Header.DEADLINE: deadline_header(timeout_s)}
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=queue.put)
    decoder = _decoder(chunk_type)
    try:
        body = encode(payload)
        with tracing.send_span(template or subject, subject, hdrs, request=True):
            check_fits(nc, f"the request to {subject}", body, hdrs)
            try:
                await nc.publish(subject, body, reply=inbox, headers=hdrs)
            except MaxPayloadError:
                raise too_large(f"the request to {subject}", message_size(body, hdrs), nc.max_payload) from None
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout_s)
            except TimeoutError:
                raise MeshTimeout(subject, timeout_s) from None
            if msg.headers and msg.headers.get("Status") == "503":
                raise Unavailable(f"no service answers on {subject}: is it running?")
            err = error_in(msg.headers)
            if err is not None:
                raise err
            chunk = _decode_reply(decoder, msg.data, subject)
            yield chunk
            if done(chunk):
                return
    finally:
        await sub.unsubscribe()


async def generation(
    nc: NatsClient,
    names: Names,
    model: str,
    version: str,
    req: GenerateRequest,
    *,
    timeout_s: float = 30.0,
) -> AsyncIterator[GenerateChunk]:
    """Stream ``req``'s completion from ``model@version``'s workers, to the final chunk.

    ``req.id`` names the generation (a fresh one when empty).  Ended before its final chunk (the
    caller closed the generator: its client is gone, or it read enough; or an error), the
    generation is cancelled on its worker, which frees its slot instead of running on to
    ``max_tokens``.
    """
    import os

    if not req.id:
        req = msgspec.structs.replace(req, id=os.urandom(16).hex())
    cancel = names.generate_cancel(req.id)  # the id is checked as a subject token here
    finished = False
    chunks = stream(
        nc,
        names.generate(model, version),
        req,
        GenerateChunk,
        done=lambda c: c.done,
        timeout_s=timeout_s,
        template=names.generate_template(),
    )
    try:
        async for chunk in chunks:
            finished = chunk.done
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        if not finished:
            with contextlib.suppress(Exception):  # best effort: the worker's deadline ends it anyway
                await nc.publish(cancel)


async def infer_with_fallback(
    nc: NatsClient, names: Names, model: str, route: Route, req: InferRequest, timeout_s: float
) -> InferReply:
    """One inference on ``route``.  No responders means the request surely never ran, so it is
    safe to try again: the route's fallback (the version a redeployment replaced, still served
    while the new one loads), then the chosen version once more after a short pause."""
    import asyncio

    candidates = [route.version, *([route.fallback] if route.fallback else []), route.version]
    for attempt, version in enumerate(candidates):
        if attempt == len(candidates) - 1:
            await asyncio.sleep(0.05)  # a worker may be (re)subscribing right now
        try:
            return await request(
                nc, names.infer(model, version), req, InferReply, timeout_s=timeout_s, template=names.infer_template()
            )
        except Unavailable:
            continue
    raise Unavailable(f"no inference worker serves {model}@{route.version} (deploy it, or start workers)")
