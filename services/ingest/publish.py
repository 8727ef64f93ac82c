"""Publishing record batches to JetStream: asynchronous, a bounded number awaiting their acks.

Each batch carries ``Nats-Msg-Id`` = dataset/version/shard/batch, so a retry after a lost ack,
or a re-run of the whole job, never stores a batch twice (within the stream's duplicate window;
beyond it, the job resumes after the last stored batch instead of re-sending).
"""

from __future__ import annotations

import asyncio

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from shared.names import Header


class BatchPublisher:
    def __init__(
        self, js: JetStreamContext, *, max_in_flight: int = 64, retries: int = 3, ack_timeout_s: float = 10
    ) -> None:
        self._js = js
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self.retries = retries
        self.ack_timeout_s = ack_timeout_s
        self.published = 0
        self.bytes = 0

    async def publish(self, subject: str, body: bytes, msg_id: str, batch: int) -> None:
        """Returns once the batch is sent (not yet acked); raises an earlier batch's failure."""
        if self._failure is not None:
            raise self._failure
        await self._slots.acquire()
        headers = {Header.MSG_ID: msg_id, Header.BATCH: str(batch)}
        try:
            ack = await self._js.publish_async(subject, body, headers=headers)
        except BaseException:
            self._slots.release()
            raise
        task = asyncio.get_running_loop().create_task(self._settle(ack, subject, body, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, ack: asyncio.Future[PubAck], subject: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            for attempt in range(self.retries + 1):
                try:
                    await asyncio.wait_for(ack, self.ack_timeout_s)
                    self.published += 1
                    self.bytes += len(body)
                    return
                except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    if attempt == self.retries:
                        raise
                    # The same Nats-Msg-Id: if the first one was stored after all, this is a no-op.
                    await asyncio.sleep(0.2 * (attempt + 1))
                    ack = await self._js.publish_async(subject, body, headers=headers)
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
        finally:
            self._slots.release()

    async def flush(self) -> None:
        """Wait for every ack; raise the first failure."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._failure is not None:
            raise self._failure
