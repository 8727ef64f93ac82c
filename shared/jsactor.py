"""Actors fed by a JetStream durable pull consumer: at-least-once work that survives a crash.

Ack discipline:

- the actor fetches only as many messages as it has free workers, so unstarted work stays in the
  stream (where another instance, or this one after a restart, picks it up);
- a message is acked after its handler returned, never before;
- while a handler runs longer than a third of ``ack_wait_s`` the actor sends ``in_progress()``
  so the server does not redeliver work that is still being done;
- a handler that raises an expected client error (4xx: the message itself is bad, retrying
  cannot help) or a message that does not decode is dead-lettered at once;
- a handler that answers 503 (``Unavailable``: JetStream electing a leader after a server died,
  say) runs again on the same delivery after the pause it asks for, for up to
  ``unavailable_retry_s``: the bus's trouble must not spend the message's ``max_deliver``;
- any other failure is nak'ed with a back-off and retried, and on its ``max_deliver``-th failure
  it is dead-lettered;
- "dead-lettered" means: republished (body and headers intact) to the dead-letter subject
  ``<prefix>.dlq.<actor>`` with the reason, delivery count and origin in headers, confirmed by
  JetStream, then ``term()``-ed so the server stops redelivering.  Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import transient
from shared.actor import ActorConfig, ActorCore, Handler, Req
from shared.errors import ServiceError, Unavailable
from shared.names import Header
from shared.outage import Outage
from shared.schemas import ActorStats

log = logging.getLogger(__name__)

# Headers on a dead-lettered message.
DLQ_REASON = Header.DLQ_REASON
DLQ_CODE = Header.DLQ_CODE
DLQ_DELIVERIES = Header.DLQ_DELIVERIES
DLQ_SUBJECT = Header.DLQ_SUBJECT
DLQ_STREAM = Header.DLQ_STREAM
DLQ_SEQUENCE = Header.DLQ_SEQUENCE


class JetStreamActorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A JetStream actor: its durable consumer ``durable`` of ``subject`` in ``stream``, and the
    ack rules above.  An unset ``max_concurrency`` takes the service's default
    (``MeshConfig.max_concurrency``) in :meth:`shared.service.Service.add_jetstream_actor`, else
    64.  There is no mailbox: the stream is the mailbox."""

    name: str
    stream: str
    subject: str
    durable: str  # the consumer's name, shared by every instance (they split its messages)
    template: str | None = None  # the subject with placeholders, for spans; default the subject
    max_concurrency: int | None = None  # handlers running at once; as many messages are fetched
    max_deliver: int = 5  # a message failing this many times is dead-lettered
    ack_wait_s: float = 30.0  # an unacked message is redelivered after this (kept alive while worked on)
    retry_backoff_s: float = 1.0  # a failed message is redelivered after this × its deliveries
    unavailable_retry_s: float = 60.0  # a 503 is retried on the same delivery for this long
    fetch_timeout_s: float = 1.0
    labels: dict[str, str] = {}  # shown with the actor's stats (model, version)


class JetStreamActor(ActorCore[Req]):
    def __init__(
        self,
        js: JetStreamContext,
        config: JetStreamActorConfig,
        handler: Handler[Req],
        request_type: type[Req],
        *,
        dead_letter_subject: str,
    ) -> None:
        core = ActorConfig(
            name=config.name,
            subject=config.subject,
            template=config.template,
            queue_group=config.durable,
            max_concurrency=config.max_concurrency,
            mailbox_size=0,  # the stream is the mailbox
            labels=config.labels,
        )
        super().__init__(core, handler, request_type)
        self._js = js
        self.stream = config.stream
        self.durable = config.durable
        self.dead_letter_subject = dead_letter_subject
        self.max_deliver = config.max_deliver
        self.ack_wait_s = config.ack_wait_s
        self.retry_backoff_s = config.retry_backoff_s
        self.unavailable_retry_s = config.unavailable_retry_s
        self.unavailable_retries = 0  # handler runs again on the same delivery after a 503
        self.unsettled = 0  # messages neither acked nor nak'ed (redelivered after ack_wait)
        self.fetch_timeout_s = config.fetch_timeout_s
        self._fetches = Outage(log, f"{self.name}: fetch", f"retrying every {self.fetch_timeout_s:g}s")
        self.dead_lettered = 0
        self._sub: JetStreamContext.PullSubscription | None = None
        self._fetcher: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._slot_free.set()

    def stats(self, queued: int = 0) -> ActorStats:
        base = super().stats(queued)
        counts = {
            "dead_lettered": self.dead_lettered,
            "unavailable_retries": self.unavailable_retries,
            "unsettled": self.unsettled,
        }
        return msgspec.structs.replace(base, extra=base.extra | counts)

    async def start(self) -> None:
        if self._fetcher is not None:
            return
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=self.max_deliver,
            ack_wait=self.ack_wait_s,
            max_ack_pending=max(self.max_concurrency * 4, 64),
        )
        self._sub = await self._js.pull_subscribe(self.subject, durable=self.durable, stream=self.stream, config=config)
        self._fetcher = asyncio.get_running_loop().create_task(self._fetch_loop(), name=f"fetch-{self.name}")

    async def stop_intake(self) -> None:
        """Stop fetching; messages already fetched are finished and acked."""
        self._stopping.set()
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
        # Unsubscribe now: a pull response that lands after the cancelled fetch would otherwise
        # sit unread in the subscription and stall the connection's drain.  Acks of messages
        # still being worked on go to their own reply subjects and are unaffected.
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("%s: unsubscribe failed", self.name, exc_info=True)

    async def _fetch_loop(self) -> None:
        assert self._sub is not None
        while not self._stopping.is_set():
            free = self.max_concurrency - self._running
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                msgs = await self._sub.fetch(free, timeout=self.fetch_timeout_s)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a disconnect, a consumer electing its leader: retry after a pause
                self._fetches.failed(exc)
                await asyncio.sleep(self.fetch_timeout_s)
                continue
            self._fetches.succeeded()
            for msg in msgs:
                self._spawn(self._work(msg))

    def _finished_one(self) -> None:
        super()._finished_one()
        self._slot_free.set()

    async def _work(self, msg: Msg) -> None:
        progress = asyncio.get_running_loop().create_task(self._keep_alive(msg))
        try:
            err = await self._run(msg)
            progress.cancel()
            if err is None:
                await msg.ack()
                return
            deliveries = msg.metadata.num_delivered or 1
            if err.code < 500:
                await self._dead_letter(msg, err, deliveries, "rejected")
            elif deliveries >= self.max_deliver:
                await self._dead_letter(msg, err, deliveries, f"failed {deliveries} times (max_deliver)")
            else:
                await msg.nak(delay=self.retry_backoff_s * deliveries)
        except Exception as exc:
            # Could not ack/nak (connection lost, the consumer electing a leader): the server
            # redelivers after ack_wait, and the work is done again (handlers are idempotent).
            self.unsettled += 1
            log.warning(
                "%s: could not settle a message (%s); it will be redelivered",
                self.name,
                transient.reason(exc),
                exc_info=not transient.jetstream_not_now(exc),
            )
        finally:
            progress.cancel()
            self._finished_one()

    async def _run(self, msg: Msg) -> ServiceError | None:
        """The handler's verdict on ``msg``.  While it is 503 the handler runs again, keeping the
        message (``_keep_alive`` holds it): up to ``unavailable_retry_s``, and not while stopping."""
        deadline = time.monotonic() + self.unavailable_retry_s
        while True:
            _, err = await self._invoke(msg)
            if not isinstance(err, Unavailable) or self._stopping.is_set():
                return err
            pause = err.retry_after_s or transient.RETRY_AFTER_S
            if time.monotonic() + pause > deadline:
                return err
            self.unavailable_retries += 1
            await asyncio.sleep(pause)

    async def _keep_alive(self, msg: Msg) -> None:
        interval = self.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as exc:  # the consumer's leader away: the next beat tries again
                log.debug("%s: in_progress failed: %s", self.name, exc)

    async def _dead_letter(self, msg: Msg, err: ServiceError, deliveries: int, why: str) -> None:
        meta = msg.metadata
        headers = dict(msg.headers or {})
        headers.update(
            {
                DLQ_REASON: f"{why}: {err.description}",
                DLQ_CODE: str(err.code),
                DLQ_DELIVERIES: str(deliveries),
                DLQ_SUBJECT: msg.subject,
                DLQ_STREAM: meta.stream or self.stream,
                DLQ_SEQUENCE: str(meta.sequence.stream if meta.sequence else 0),
            }
        )
        headers.pop(Header.MSG_ID, None)  # the DLQ is not deduplicated against the origin
        # Confirmed by JetStream before we give up on the original: nothing is lost in between.
        await self._js.publish(self.dead_letter_subject, msg.data, headers=headers)
        await msg.term()
        self.dead_lettered += 1
        log.warning("%s: message %s dead-lettered to %s: %s", self.name, msg.subject, self.dead_letter_subject, why)
