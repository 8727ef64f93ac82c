"""Actors: typed message handlers bound to a NATS subject, with bounded concurrency.

nats-py runs a subscription's callback one message at a time, so an actor's callback never does
the work itself: it hands the message to one of at most ``max_concurrency`` worker tasks, or
parks it in a bounded mailbox when all are busy.  When the mailbox is full too, the sender gets
an immediate ``429 Overloaded`` error reply with the numbers: backpressure, never an unbounded
queue and never a silent drop.

Per message an actor decodes the request into its msgspec type (failure: ``400``), refuses it
if its deadline has passed (``504``), runs the handler under a CONSUMER span whose parent is the
trace context from the message headers, and replies with the encoded result or with an error in
the micro-protocol headers.  A handler that raises never kills the actor.  A reply larger than
the bus carries (the server's ``max_payload``) is not sent: the caller gets a ``413`` error reply
with the sizes at once, rather than waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import tracing, transient
from shared.client import message_size, too_large
from shared.connect import wait_sent
from shared.errors import BadRequest, DeadlineExceeded, InternalError, Overloaded, ServiceError, Unavailable
from shared.histogram import LatencyHistogram
from shared.schemas import ActorStats
from shared.wire import deadline_ms, encode, error_headers

log = logging.getLogger(__name__)

Req = TypeVar("Req")


@dataclass(slots=True)
class Call:
    """What a handler knows about the message it is handling, besides the decoded request."""

    msg: Msg
    deadline_ms: int | None

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def headers(self) -> Mapping[str, str]:
        return self.msg.headers or {}

    def remaining_s(self) -> float | None:
        """Seconds left before the caller's deadline, or None when it set none."""
        if self.deadline_ms is None:
            return None
        return self.deadline_ms / 1000 - time.time()


Handler = Callable[[Req, Call], Awaitable[Any]]

DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAILBOX_SIZE = 256
UNAVAILABLE_LOG_EVERY_S = 10.0


class ActorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where a core-NATS actor listens and its bounds (as nats micro's ``EndpointConfig``).

    Unset limits take the service's defaults (``MeshConfig.max_concurrency``/``mailbox_size``)
    in :meth:`shared.service.Service.add_actor`, else 64 and 256.  ``queue_group``: None is the
    service's queue group in ``add_actor`` (instances share the work) and no group for a bare
    :class:`Actor`; ``""`` is no group (every instance gets every message)."""

    name: str
    subject: str
    template: str | None = None  # the subject with placeholders, for spans; default the subject
    queue_group: str | None = None
    max_concurrency: int | None = None  # handlers running at once
    mailbox_size: int | None = None  # messages waiting for a free handler; more are refused (429)
    labels: dict[str, str] = {}  # shown with the actor's stats (model, version)


class ActorCore(Generic[Req]):
    """What every actor shares: decoding, handler invocation, spans, counters, idle tracking."""

    def __init__(self, config: ActorConfig, handler: Handler[Req], request_type: type[Req]) -> None:
        max_concurrency = DEFAULT_MAX_CONCURRENCY if config.max_concurrency is None else config.max_concurrency
        mailbox_size = DEFAULT_MAILBOX_SIZE if config.mailbox_size is None else config.mailbox_size
        if max_concurrency < 1 or mailbox_size < 0:
            raise ValueError(f"{config.name}: max_concurrency must be ≥ 1 and mailbox_size ≥ 0")
        self.name = config.name
        self.subject = config.subject
        self.template = config.template or config.subject
        self._span_name = f"process {self.template}"
        self.queue_group = config.queue_group or None
        self.labels = dict(config.labels)
        self.max_concurrency = max_concurrency
        self.mailbox_size = mailbox_size
        self._handler = handler
        self._decoder: msgspec.msgpack.Decoder[Req] = msgspec.msgpack.Decoder(request_type)
        self._traced = not tracing.tracing_disabled()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        # counters
        self.requests = 0
        self.errors = 0
        self.overloaded = 0
        self.unavailable = 0  # 503s: JetStream (or what the handler needs) cannot serve now
        self._unavailable_logged = 0  # how many of them the log has mentioned
        self._unavailable_logged_at = -math.inf
        self.processing_ns = 0
        self.last_error = ""
        self.latency = LatencyHistogram()
        self.extra_stats: Callable[[], dict[str, Any]] | None = None  # merged into discovery STATS data

    async def start(self) -> None:
        """Begin taking messages."""
        raise NotImplementedError

    async def stop_intake(self) -> None:
        """Stop taking new messages; accepted ones are still finished."""
        raise NotImplementedError

    # -- running work ------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        self._running += 1
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finished_one(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no work is running or queued; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def cancel(self) -> int:
        """Cancel whatever is still running (after a drain timed out); returns how many."""
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _invoke(self, msg: Msg) -> tuple[Any, ServiceError | None]:
        """Decode and run the handler for one message; returns (result, error)."""
        t0 = time.perf_counter_ns()
        self.requests += 1
        headers = msg.headers
        span = token = None
        if self._traced:
            span = tracing.start_consumer_span(self._span_name, self.template, msg.subject, headers, self.queue_group)
            token = tracing.activate(span)
        try:
            deadline = deadline_ms(headers) if headers else None
            if deadline is not None and deadline < time.time() * 1000:
                raise DeadlineExceeded(f"{self.name}: the caller's deadline passed before work started")
            try:
                # An empty body means "all defaults", so `nats req <subject> ""` works too.
                request = self._decoder.decode(msg.data or b"\x80")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRequest(f"{self.name}: cannot decode the request: {exc}") from None
            return await self._handler(request, Call(msg, deadline)), None
        except ServiceError as err:
            self._count_error(err, span)
            if isinstance(err, Unavailable):
                self._note_unavailable(err)
            elif err.code >= 500:
                log.error("%s: %s", self.name, err)
            else:  # an expected outcome for the caller, not a failure of ours
                log.debug("%s: %s", self.name, err)
            return None, err
        except Exception as exc:
            if transient.jetstream_not_now(exc):  # an election, a lost quorum: the caller retries
                not_now = Unavailable(
                    f"{self.name}: JetStream cannot serve this now ({transient.reason(exc)}); retry",
                    retry_after_s=transient.RETRY_AFTER_S,
                )
                self._count_error(not_now, span)
                self._note_unavailable(not_now)
                return None, not_now
            failure = InternalError(f"{self.name}: internal error ({type(exc).__name__}); see the service log")
            self._count_error(failure, span)
            log.exception("%s: handler failed", self.name)
            return None, failure
        finally:
            elapsed = time.perf_counter_ns() - t0
            self.processing_ns += elapsed
            self.latency.observe_ns(elapsed)
            if span is not None:
                tracing.deactivate(token)
                span.end()

    def _note_unavailable(self, err: Unavailable) -> None:
        """Counted always; logged at most every ``UNAVAILABLE_LOG_EVERY_S``, with how many since:
        while a stream elects a leader every request meets it, and one line says so."""
        self.unavailable += 1
        now = time.monotonic()
        if now - self._unavailable_logged_at >= UNAVAILABLE_LOG_EVERY_S:
            since = self.unavailable - self._unavailable_logged
            log.warning("%s: %s (%d answered 503 since the last such line)", self.name, err.description, since)
            self._unavailable_logged, self._unavailable_logged_at = self.unavailable, now

    def _count_error(self, err: ServiceError, span: Any) -> None:
        self.errors += 1
        self.last_error = f"{err.code} {err.description}"
        if span is not None:
            tracing.mark_error(span, type(err).__name__, err.description)

    def stats(self, queued: int = 0) -> ActorStats:
        return ActorStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            requests=self.requests,
            errors=self.errors,
            overloaded=self.overloaded,
            unavailable=self.unavailable,
            in_flight=self._running,
            queued=queued,
            max_concurrency=self.max_concurrency,
            mailbox_size=self.mailbox_size,
            processing_time_ns=self.processing_ns,
            last_error=self.last_error,
            latency_buckets=self.latency.cumulative(),
            extra=self.extra_stats() if self.extra_stats else {},
            labels=self.labels,
        )


class Actor(ActorCore[Req]):
    """An actor fed by a core NATS subscription (request/reply or publish), usually in a queue
    group so that instances share the load."""

    def __init__(self, nc: NatsClient, config: ActorConfig, handler: Handler[Req], request_type: type[Req]) -> None:
        super().__init__(config, handler, request_type)
        self._nc = nc
        self._sub: Subscription | None = None
        self._mailbox: deque[Msg] = deque()

    async def start(self) -> None:
        """Subscribe; returns once the server has the subscription, so the actor is reachable."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self.subject, queue=self.queue_group or "", cb=self._on_message)
            await wait_sent(self._nc)

    async def stop_intake(self) -> None:
        """Unsubscribe: new messages go to other instances; accepted ones are still served."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except Exception:  # the connection may already be closing
                log.debug("%s: unsubscribe failed", self.name, exc_info=True)

    def stats(self, queued: int = 0) -> ActorStats:
        return super().stats(queued=len(self._mailbox))

    async def _on_message(self, msg: Msg) -> None:
        # Runs on nats-py's per-subscription task: must never wait on work.
        if self._running < self.max_concurrency:
            self._spawn(self._work(msg))
        elif len(self._mailbox) < self.mailbox_size:
            self._mailbox.append(msg)
        else:
            self.overloaded += 1
            await self._reply_error(
                msg,
                Overloaded(
                    f"{self.name}: overloaded ({self._running} running, limit {self.max_concurrency}; "
                    f"{len(self._mailbox)} queued, limit {self.mailbox_size}): retry later, "
                    "add instances or raise mailbox_size"
                ),
            )

    async def _work(self, msg: Msg) -> None:
        try:
            while True:
                result, err = await self._invoke(msg)
                if msg.reply:
                    if err is None:
                        await self._reply(msg, encode(result))
                    else:
                        await self._reply_error(msg, err)
                if not self._mailbox:
                    return
                msg = self._mailbox.popleft()
        finally:
            self._finished_one()

    async def _reply(self, msg: Msg, body: bytes) -> None:
        size, limit = message_size(body), self._nc.max_payload
        if size <= limit:
            await self._publish(msg.reply, body, None)
            return
        err = too_large(f"{self.name}: the output", size, limit)
        self._count_error(err, None)
        log.warning("%s: %s", self.name, err)
        await self._reply_error(msg, err)

    async def _reply_error(self, msg: Msg, err: ServiceError) -> None:
        if msg.reply:
            await self._publish(msg.reply, b"", error_headers(err))

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        try:
            await self._nc.publish(subject, body, headers=headers)
        except Exception:  # closed connection: the caller times out; nothing else to do
            log.warning("%s: could not send the reply to %s", self.name, subject, exc_info=True)
