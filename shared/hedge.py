"""Hedged requests: when an answer is late, ask again, and take the first answer.

Inference has no side effects, so a request whose worker died (SIGKILL: its requests wait for
their deadline) or stalls (SIGSTOP, a long GC pause, a host cut off) need not wait: after a
delay derived from the latency observed for the same target (its p95, :class:`LatencyWindow`),
the same request is sent again, and the first answer wins (the other attempt is cancelled; its
worker's work is wasted).  The router sends a hedge straight to a worker that answered
recently (its own subject), not through the queue group, which could pick the stalled worker
again.  Extra load is
bounded: hedges are at most ``budget`` of the requests (a token bucket that refills with every
request, holding at most ``burst``), and at most ``max_hedges`` per request.  With one of N
workers stalled, 1/N of the requests are late: a budget under 1/N runs out during a long
stall, and the requests it cannot hedge wait for their deadline, as without hedging.

A request with no answer because no worker listens (no responders) is not hedged here: it
surely never ran, and the caller's fallback resends it at once (``shared.client``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class LatencyWindow:
    """A quantile of the latest ``size`` latencies, recomputed every ``every`` observations
    (sorting 256 floats per 32 requests costs little; per request it would not)."""

    def __init__(self, quantile: float = 0.95, size: int = 256, every: int = 32) -> None:
        self.quantile = quantile
        self.size = size
        self.every = every
        self._samples: list[float] = []
        self._next = 0
        self._since = 0
        self.value: float | None = None  # None until ``every`` samples were seen

    def observe(self, seconds: float) -> None:
        if len(self._samples) < self.size:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self.size
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            ordered = sorted(self._samples)
            self.value = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]


@dataclass
class HedgeStats:
    hedged: int = 0  # attempts sent because an answer was late
    won: int = 0  # requests a hedge answered first
    skipped: int = 0  # late requests not hedged: the budget was spent


class Hedger:
    def __init__(
        self,
        *,
        budget: float = 0.1,
        max_hedges: int = 2,
        burst: float = 10.0,
        min_delay_s: float = 0.01,
        max_delay_s: float = 2.0,
        on_hedge: Callable[[Hashable, bool], None] | None = None,
    ) -> None:
        """``budget``: hedges per request at most (0 turns hedging off); the delay is the
        target's p95 latency, within [``min_delay_s``, ``max_delay_s``]; ``max_delay_s`` also
        applies before enough latencies are known.  ``on_hedge(key, won)`` is told of each
        hedge sent (``won`` False) and of each request a hedge answered (``won`` True)."""
        self.budget = budget
        self.max_hedges = max_hedges
        self.burst = burst  # hedges that may be sent at once when the budget has been saved up
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.stats = HedgeStats()
        self._on_hedge = on_hedge
        self._tokens = 1.0  # starts able to hedge once
        self._windows: dict[Hashable, LatencyWindow] = {}

    def delay_s(self, key: Hashable) -> float:
        window = self._windows.get(key)
        p95 = window.value if window is not None else None
        return self.max_delay_s if p95 is None else min(self.max_delay_s, max(self.min_delay_s, p95))

    async def run(self, key: Hashable, attempt: Callable[[int], Awaitable[T]]) -> T:
        """``attempt(0)``, and ``attempt(1)``, ``attempt(2)``… after each delay without an
        answer (within the budget); the first answer, or the last error when every attempt
        failed.  The attempt number lets the caller send a hedge elsewhere than the first."""
        if self.budget <= 0:
            return await attempt(0)
        self._tokens = min(self.burst, self._tokens + self.budget)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(_awaited(attempt, 0))]
        sent = [loop.time()]  # when each attempt was sent
        try:
            result, answered = await self._first_answer(key, attempt, tasks, sent)
        finally:
            for task in tasks:
                task.cancel()
        # The answering attempt's own latency, not the request's: a hedged answer counted from the
        # first send would raise the p95 that sets the delay by one delay a round while a worker
        # stalls, until hedges come too late to help.
        self._window(key).observe(loop.time() - sent[answered])
        return result

    async def _first_answer(
        self, key: Hashable, attempt: Callable[[int], Awaitable[T]], tasks: list[asyncio.Task[T]], sent: list[float]
    ) -> tuple[T, int]:
        """The first answer and the number of the attempt that gave it."""
        pending = set(tasks)
        error: BaseException | None = None
        budget_left = True
        while pending:
            can_hedge = budget_left and len(tasks) <= self.max_hedges
            done, pending = await asyncio.wait(
                pending, timeout=self.delay_s(key) if can_hedge else None, return_when=asyncio.FIRST_COMPLETED
            )
            answered = [t for t in done if t.exception() is None]  # exception() also marks errors seen
            if answered:
                if answered[0] is not tasks[0]:
                    self.stats.won += 1
                    self._tell(key, True)
                return answered[0].result(), tasks.index(answered[0])
            error = next((t.exception() for t in done), error)
            if not done and can_hedge:  # late: ask again, if the budget allows
                if self._tokens < 1.0:  # spent: wait for what was sent
                    self.stats.skipped += 1
                    budget_left = False
                    continue
                self._tokens -= 1.0
                self.stats.hedged += 1
                self._tell(key, False)
                hedge = asyncio.get_running_loop().create_task(_awaited(attempt, len(tasks)))
                tasks.append(hedge)
                sent.append(asyncio.get_running_loop().time())
                pending.add(hedge)
        assert error is not None
        raise error

    def _tell(self, key: Hashable, won: bool) -> None:
        if self._on_hedge is not None:
            self._on_hedge(key, won)

    def _window(self, key: Hashable) -> LatencyWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = LatencyWindow()
        return window


async def _awaited(attempt: Callable[[int], Awaitable[T]], n: int) -> T:
    return await attempt(n)


class Responders:
    """The workers that answered most recently, per (model, version), and whether one of them is
    suspected of stalling (a hedge answered first lately): where hedges go and, while a stall
    is suspected, where first attempts go instead of the queue group (which would keep giving
    the stalled worker its share)."""

    def __init__(self, keep: int = 1024, suspect_s: float = 2.0, fresh_s: float = 0.5) -> None:
        """``keep``: workers remembered per version, most recent first.  It must exceed any
        deployment's worker count: while a stall is suspected first attempts go only to the
        workers remembered (with 8, 16 workers served at half their capacity: bench/scale.py)."""
        self.keep = keep
        self.suspect_s = suspect_s
        self.fresh_s = fresh_s
        self._recent: dict[tuple[str, str], dict[str, float]] = {}  # worker → when; oldest first
        self._suspect_until: dict[tuple[str, str], float] = {}

    def answered(self, model: str, version: str, worker: str) -> None:
        if not worker:
            return
        recent = self._recent.setdefault((model, version), {})
        recent.pop(worker, None)
        recent[worker] = time.monotonic()
        if len(recent) > self.keep:
            del recent[next(iter(recent))]

    def pick(self, model: str, version: str, n: int) -> str | None:
        """For hedge ``n`` (1, 2, …): the n-th most recent responder, None when fewer are known."""
        recent = list(self._recent.get((model, version), ()))
        return recent[-n] if n <= len(recent) else None

    def suspect(self, model: str, version: str) -> None:
        """A hedge answered first: some worker of ``model@version`` may be stalled."""
        self._suspect_until[(model, version)] = time.monotonic() + self.suspect_s

    def first(self, model: str, version: str) -> str | None:
        """Where a first attempt goes: None (the queue group) unless a stall is suspected, then
        one of the workers that answered within ``fresh_s``, at random."""
        until = self._suspect_until.get((model, version))
        if until is None:
            return None
        now = time.monotonic()
        if now > until:
            del self._suspect_until[(model, version)]
            return None
        fresh = [w for w, t in self._recent.get((model, version), {}).items() if now - t <= self.fresh_s]
        return random.choice(fresh) if fresh else None
