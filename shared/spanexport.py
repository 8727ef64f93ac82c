"""Finished spans to the mesh: an OpenTelemetry exporter that publishes ``SpanBatch`` messages
(``<prefix>.spans.<service>``) for the metrics service's recent traces.

Threads: the SDK's ``BatchSpanProcessor`` calls :meth:`MeshSpanExporter.export` from its own
worker thread (and from the thread that calls ``force_flush``), while the NATS client belongs to
the service's asyncio loop.  So the exporter never touches NATS: it encodes the batch and hands
the bytes to a ``publish`` callable the service attaches once connected, one that is safe to
call from any thread and does not block (:class:`LoopPublisher` is one).  Before
:meth:`~MeshSpanExporter.attach` and after :meth:`~MeshSpanExporter.detach` spans are dropped
and counted: nothing waits, nothing piles up (the processor's own queue is bounded too).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from shared.schemas import SpanBatch, SpanKindName, SpanRecord

log = logging.getLogger(__name__)

MAX_ATTRIBUTES = 32  # per span: the dashboard shows them, it is not a trace store
MAX_VALUE_CHARS = 256
MAX_SPANS_PER_BATCH = 64  # keeps one message far below NATS's 1 MiB default max payload

_encoder = msgspec.msgpack.Encoder()


def span_record(span: ReadableSpan, max_attributes: int = MAX_ATTRIBUTES) -> SpanRecord:
    """One finished SDK span as the mesh's ``SpanRecord``: ids as lowercase hex, attribute values
    as (truncated) strings, at most ``max_attributes`` of them."""
    context = span.context
    parent = span.parent
    attributes: dict[str, str] = {}
    for name, value in (span.attributes or {}).items():
        if len(attributes) >= max_attributes:
            break
        attributes[name] = _text(value)
    error = span.status.status_code is StatusCode.ERROR
    if error and span.status.description and len(attributes) < max_attributes:
        attributes.setdefault("otel.status_description", span.status.description[:MAX_VALUE_CHARS])
    start = span.start_time or 0
    return SpanRecord(
        trace_id=format(context.trace_id, "032x") if context else "",
        span_id=format(context.span_id, "016x") if context else "",
        parent_id=format(parent.span_id, "016x") if parent is not None and parent.is_valid else "",
        name=span.name,
        kind=cast(SpanKindName, span.kind.name),  # OpenTelemetry's SpanKind names: the same five
        service=str(span.resource.attributes.get("service.name", "")),
        start_ns=start,
        end_ns=span.end_time or start,
        error=error,
        attributes=attributes,
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


class MeshSpanExporter(SpanExporter):
    """Encodes finished spans as ``SpanBatch`` (MessagePack) and hands them to the attached
    ``publish(bytes)``; drops and counts them while none is attached or when it raises."""

    def __init__(self, service: str, instance: str, max_attributes: int = MAX_ATTRIBUTES) -> None:
        self.service = service
        self.instance = instance
        self.max_attributes = max_attributes
        self.exported = 0  # spans handed to publish
        self.dropped = 0  # spans not sent: nothing attached, or publish failed
        self._publish: Callable[[bytes], None] | None = None
        self._lock = threading.Lock()

    def attach(self, publish: Callable[[bytes], None]) -> None:
        """Start sending through ``publish`` (thread-safe, non-blocking: it runs on the exporter's
        thread)."""
        with self._lock:
            self._publish = publish

    def detach(self, publish: Callable[[bytes], None] | None = None) -> None:
        """Stop sending (spans are dropped again).  With ``publish``, only if it is the one
        attached, so one service detaching does not cut off another in the same process."""
        with self._lock:
            if publish is None or self._publish is publish:
                self._publish = None

    @property
    def attached(self) -> bool:
        return self._publish is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        publish = self._publish
        if publish is None:
            self._count(dropped=len(spans))
            return SpanExportResult.SUCCESS  # not a failure of the SDK's: nowhere to send yet
        records = [span_record(s, self.max_attributes) for s in spans]
        for i in range(0, len(records), MAX_SPANS_PER_BATCH):
            chunk = records[i : i + MAX_SPANS_PER_BATCH]
            try:
                publish(_encoder.encode(SpanBatch(service=self.service, instance=self.instance, spans=chunk)))
            except Exception:  # the loop is closed, the connection gone: spans are not worth a crash
                self._count(dropped=len(records) - i)
                log.debug("span batch not published", exc_info=True)
                return SpanExportResult.FAILURE
            self._count(exported=len(chunk))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.detach()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing buffered here: every export is handed over at once

    def _count(self, *, exported: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.exported += exported
            self.dropped += dropped


class LoopPublisher:
    """A ``publish(bytes)`` callable from any thread onto an asyncio loop: each call schedules
    ``send(subject, data)`` (e.g. ``nc.publish``) as a task on ``loop``, at most ``max_pending``
    at once; beyond that, or once the loop is closed, the batch is dropped and counted."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[str, bytes], Awaitable[Any]],
        subject: str,
        max_pending: int = 16,
    ) -> None:
        self.loop = loop
        self.send = send
        self.subject = subject
        self.max_pending = max_pending
        self.dropped = 0  # batches
        self.failed = 0
        self._pending: set[asyncio.Future[Any]] = set()

    def __call__(self, data: bytes) -> None:
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        self.loop.call_soon_threadsafe(self._start, data)

    async def wait_sent(self, timeout_s: float = 2.0) -> bool:
        """Wait (on the loop) until the publishes started so far have finished, e.g. after
        ``flush_tracing`` and before draining NATS; False if some still run after ``timeout_s``."""
        pending = list(self._pending)
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        return not still

    def _start(self, data: bytes) -> None:  # on the loop
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        task = asyncio.ensure_future(self.send(self.subject, data))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failed += 1
            log.debug("span batch publish failed: %s", task.exception())
