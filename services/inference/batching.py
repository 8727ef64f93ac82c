"""Dynamic batching: requests that arrive while the model is busy share its next forward pass.

- When the model is free and something is queued, a batch is released at once: at low load a
  request never waits for others (concurrency 1 costs no latency).
- While a forward pass runs, requests queue up; the next batch takes up to ``max_batch_size``
  rows of them.
- Under sustained load (the last batch was full), a short batch may wait up to ``max_wait_ms``
  for more rows before it is released.
- The forward pass runs in a worker thread, never on the event loop.  If a batched pass fails,
  each request is retried alone, so one bad request never fails its batch-mates.
- At most ``max_queued`` requests wait (the callers' concurrency, in the inference service): one
  more is refused with :class:`~shared.errors.Overloaded`, never queued without limit.
- The batcher owns its loop task (:meth:`DynamicBatcher.start` / :meth:`DynamicBatcher.stop`);
  should it ever crash, the error is logged, waiting requests fail with it, and so do new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext

from shared import tracing
from shared.errors import Overloaded

log = logging.getLogger(__name__)
DEFAULT_MAX_QUEUED = 1024
Outputs = dict[str, np.ndarray]


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[tuple[Outputs, int]]
    queued_at: float = field(default_factory=time.perf_counter)
    span: SpanContext | None = None  # the request's span, linked from the batch's forward span


class DynamicBatcher:
    def __init__(
        self,
        forward: Callable[[np.ndarray], Outputs],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        executor: Executor | None = None,
        name: str = "forward",
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.executor = executor
        self.max_queued = max_queued
        self._queue: deque[_Pending] = deque()  # at most max_queued requests
        self._crashed: BaseException | None = None
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_full = False
        self._traced = not tracing.tracing_disabled()
        self.name = name
        # metrics
        self.batches = 0
        self.rows = 0
        self.sizes: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
            self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._crashed = task.exception()
        log.error("%s: the batcher crashed", self.name, exc_info=self._crashed)
        self._fail_queued(RuntimeError(f"the batcher crashed ({type(self._crashed).__name__})"))

    def _fail_queued(self, exc: Exception) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._queued_rows = 0

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail_queued(RuntimeError("the model was unloaded"))

    async def submit(self, rows: np.ndarray) -> tuple[Outputs, int]:
        """Queue rows (first dimension = records); returns their outputs and the batch size.
        :class:`~shared.errors.Overloaded` when ``max_queued`` requests already wait."""
        if self._crashed is not None:
            raise RuntimeError(f"the batcher crashed ({type(self._crashed).__name__})")
        if len(self._queue) >= self.max_queued:
            raise Overloaded(
                f"batch queue full ({len(self._queue)} waiting, limit {self.max_queued}): "
                "add inference workers or raise max_batch_size"
            )
        future: asyncio.Future[tuple[Outputs, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future, span=tracing.current_context() if self._traced else None))
        self._queued_rows += len(rows)
        self._wake.set()
        return await future

    def stats(self) -> dict[str, object]:
        """Counters for discovery and Prometheus: passes, rows, release reasons, size histogram."""
        return {
            "batches": self.batches,
            "batch_rows": self.rows,
            "batch_reasons": dict(self.reasons),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "batch_queued": self.queued,
        }

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            reason = "free"
            if self._queued_rows >= self.max_batch_size:
                reason = "full"
            elif self._last_full and self.max_wait_s > 0:
                deadline = self._queue[0].queued_at + self.max_wait_s
                while self._queued_rows < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
                reason = "full" if self._queued_rows >= self.max_batch_size else "max_wait"
            batch = self._take()
            await self._serve(batch)
            self.reasons[reason] += 1

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue and (not batch or rows + len(self._queue[0].rows) <= self.max_batch_size):
            item = self._queue.popleft()
            batch.append(item)
            rows += len(item.rows)
        self._queued_rows -= rows
        self._last_full = rows >= self.max_batch_size
        return batch

    async def _serve(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        live = [p for p in batch if not p.future.done()]  # a caller that gave up is skipped
        if not live:
            return
        rows = sum(len(p.rows) for p in live)
        self.batches += 1
        self.rows += rows
        self.sizes[rows] += 1
        span = None
        if self._traced:  # one span for the pass, linked to every request it served
            links = [p.span for p in live if p.span is not None]
            span = tracing.start_batch_span(
                self.name, links, {"aimesh.batch.size": rows, "aimesh.batch.requests": len(live)}
            )
        try:
            x = live[0].rows if len(live) == 1 else np.concatenate([p.rows for p in live])
            out = await loop.run_in_executor(self.executor, self.forward, x)
        except Exception as exc:
            if span is not None:  # ended before the retries below, which are passes of their own
                tracing.mark_error(span, type(exc).__name__, str(exc))
                span.end()
                span = None
            await self._isolate(live, exc)
            return
        finally:
            if span is not None:
                span.end()
        start = 0
        for item in live:
            n = len(item.rows)
            if not item.future.done():
                item.future.set_result(({k: v[start : start + n] for k, v in out.items()}, rows))
            start += n

    async def _isolate(self, live: list[_Pending], exc: Exception) -> None:
        """A failed pass: a lone request gets the error; several are each served alone, so only
        the culprit fails."""
        if len(live) == 1:
            if not live[0].future.done():
                live[0].future.set_exception(exc)
            return
        for item in live:
            await self._serve([item])
