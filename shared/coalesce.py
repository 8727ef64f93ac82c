"""Requests for the same model version that arrive in one turn of the event loop travel as one.

Under load a gateway receives many small requests within one turn of its event loop.  Each
would cost a NATS request on the gateway (an inbox subscription, a future, a message each way)
and a message to decode, dispatch and answer on a worker, which then batches their rows
anyway.  :class:`Coalescer` sends them as one request: rows concatenated per input, the reply's
outputs split back by row counts.  Nothing waits for company: a group is sent on the next turn
of the loop, so a lone request pays one loop turn and goes out as it came.

Only requests that could have been one request are grouped: the same key (the caller's: served
version, fallback, deadline), the same input names, dtypes and per-row shapes, at least one
row; at most ``max_rows`` rows (the deployment's batch size) and ``max_bytes`` of inputs.
A group whose send fails with an error about its content (:class:`~shared.errors.ServiceError`:
a 400, a 413, a model error) is sent again one request at a time, so that each request gets its
own answer; errors about the version (no worker answers, a timeout) are every member's, as they
would have been for each alone.  A member whose caller gave up is left out of its group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext

from shared import tracing
from shared.errors import ServiceError

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Served:
    """What one inference gave: the version that served it and its outputs, row-aligned."""

    version: str
    outputs: Arrays


Send = Callable[[Arrays], Awaitable[Served]]


@dataclass(slots=True)
class _Member:
    inputs: Arrays
    rows: int
    # None: "send it yourself" (alone, or its group failed on content); else its share.
    future: asyncio.Future[Served | None]
    trace: SpanContext | None


@dataclass(slots=True)
class _Group:
    send: Send
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0


@dataclass
class CoalesceStats:
    groups: int = 0  # requests sent for two or more callers
    coalesced: int = 0  # callers served by those
    isolated: int = 0  # groups sent again one by one after a content error


class Coalescer:
    def __init__(self, *, max_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.stats = CoalesceStats()
        self._open: dict[Hashable, _Group] = {}
        self._closed: list[_Group] = []  # full before the turn ended
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def infer(self, key: Hashable, inputs: Arrays, send: Send, *, max_rows: int) -> Served:
        """``send(inputs)``, possibly as part of one request with others of the same ``key``."""
        rows = _rows(inputs)
        nbytes = sum(a.nbytes for a in inputs.values())
        if rows is None or rows >= max_rows or nbytes >= self.max_bytes:
            return await send(inputs)
        group = self._group_for((key, _signature(inputs)), send, rows, nbytes, max_rows)
        future: asyncio.Future[Served | None] = asyncio.get_running_loop().create_future()
        trace = tracing.current_context() if not tracing.tracing_disabled() else None
        group.members.append(_Member(inputs, rows, future, trace))
        group.rows += rows
        group.nbytes += nbytes
        share = await future
        return await send(inputs) if share is None else share

    def _group_for(self, signature: Hashable, send: Send, rows: int, nbytes: int, max_rows: int) -> _Group:
        group = self._open.get(signature)
        if group is not None and (group.rows + rows > max_rows or group.nbytes + nbytes > self.max_bytes):
            self._closed.append(group)
            group = None
        if group is None:
            group = self._open[signature] = _Group(send)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return group

    def _flush(self) -> None:
        self._flush_scheduled = False
        groups = [*self._closed, *self._open.values()]
        self._closed, self._open = [], {}
        for group in groups:
            live = [m for m in group.members if not m.future.done()]
            if len(live) == 1:
                live[0].future.set_result(None)  # alone: its own task sends it, as if never grouped
            elif live:
                task = asyncio.get_running_loop().create_task(self._send(group.send, live))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, send: Send, members: list[_Member]) -> None:
        inputs = {name: np.concatenate([m.inputs[name] for m in members]) for name in members[0].inputs}
        try:
            served = await self._traced(send, inputs, members)
        except ServiceError:
            self.stats.isolated += 1
            _each_alone(members)
            return
        except BaseException as exc:  # about the version, not the content: every member's answer
            for m in members:
                if not m.future.done():
                    m.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._share(served, members)

    @staticmethod
    async def _traced(send: Send, inputs: Arrays, members: list[_Member]) -> Served:
        if tracing.tracing_disabled():
            return await send(inputs)
        # One span for the group, linked to every request in it.
        contexts = [m.trace for m in members if m.trace is not None]
        span = tracing.start_batch_span("coalesced infer", contexts, {"aimesh.coalesced.requests": len(members)})
        token = tracing.activate(span)
        try:
            return await send(inputs)
        except BaseException as exc:
            tracing.mark_error(span, type(exc).__name__, str(exc))
            raise
        finally:
            tracing.deactivate(token)
            span.end()

    def _share(self, served: Served, members: list[_Member]) -> None:
        total = sum(m.rows for m in members)
        if any(len(v) != total for v in served.outputs.values()):  # outputs not one per row
            _each_alone(members)
            return
        self.stats.groups += 1
        self.stats.coalesced += len(members)
        start = 0
        for m in members:
            if not m.future.done():
                share = {k: v[start : start + m.rows] for k, v in served.outputs.items()}
                m.future.set_result(Served(served.version, share))
            start += m.rows

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _each_alone(members: list[_Member]) -> None:
    for m in members:
        if not m.future.done():
            m.future.set_result(None)


def _rows(inputs: Arrays) -> int | None:
    """The request's row count when every input has the same first dimension (> 0), else None
    (such a request is not grouped)."""
    rows = None
    for array in inputs.values():
        if array.ndim == 0 or (rows is not None and len(array) != rows):
            return None
        rows = len(array)
    return rows or None


def _signature(inputs: Arrays) -> Hashable:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))
