"""Rates from cumulative snapshots (pure): throughput, error rate and p99 per model and variant,
and the inference pool's load, for the dashboard and the autoscaler.

Snapshots carry counters since each process started.  For every instance the difference between
its last two snapshots, over their time apart, is its recent rate; a counter that went down
means the instance restarted (the new value is the difference).  Instances whose last snapshot
is older than ``stale_after`` intervals are gone and count no more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.histogram import LATENCY_BOUNDS_S
from shared.schemas import ActorStats, MetricsSnapshot

STALE_AFTER_INTERVALS = 3.0
SERVING_STATES = ("ready",)


@dataclass
class Window:
    """Counts over a span of time, summed over instances."""

    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))  # not cumulative

    def add(self, seconds: float, requests: int, errors: int, cumulative_delta: list[int]) -> None:
        self.seconds = max(self.seconds, seconds)
        self.requests += requests
        self.errors += errors
        previous = 0
        for i, c in enumerate(cumulative_delta[: len(self.buckets)]):
            self.buckets[i] += max(c - previous, 0)
            previous = c

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile_ms(self, q: float) -> float | None:
        """An estimate (linear within the bucket) of quantile ``q``; None with no requests."""
        total = sum(self.buckets)
        if not total:
            return None
        rank, seen, lower = q * total, 0, 0.0
        for bound, count in zip((*LATENCY_BOUNDS_S, LATENCY_BOUNDS_S[-1] * 2), self.buckets, strict=True):
            if count and seen + count >= rank:
                return (lower + (bound - lower) * (rank - seen) / count) * 1000
            seen += count
            lower = bound
        return LATENCY_BOUNDS_S[-1] * 1000


def _delta(now: int, before: int | None) -> int:
    if before is None:
        return 0
    return now - before if now >= before else now


def _delta_list(now: list[int], before: list[int] | None) -> list[int]:
    if before is None or len(before) != len(now):
        return [0] * len(now)
    if now and before and now[-1] < before[-1]:
        return list(now)
    return [a - b for a, b in zip(now, before, strict=True)]


@dataclass(frozen=True)
class PoolLoad:
    replicas: int
    in_flight: int
    requests_total: int
    p99_ms: float | None


class Rates:
    def __init__(self) -> None:
        self._last: dict[str, MetricsSnapshot] = {}
        self._routes: dict[str, dict[tuple[str, str], Window]] = {}  # instance → (model, version) → window
        self._pool: dict[str, Window] = {}  # inference instance → its inference actors' window

    def add(self, snap: MetricsSnapshot) -> None:
        before = self._last.get(snap.instance)
        self._last[snap.instance] = snap
        seconds = snap.ts - before.ts if before is not None else 0.0
        if snap.routes:
            old = {(r.model, r.version): r for r in (before.routes if before else [])}
            windows: dict[tuple[str, str], Window] = {}
            for r in snap.routes:
                o = old.get((r.model, r.version))
                w = windows[(r.model, r.version)] = Window()
                w.add(
                    seconds,
                    _delta(r.requests, o.requests if o else None),
                    _delta(sum(r.errors.values()), sum(o.errors.values()) if o else None),
                    _delta_list(r.latency_buckets, o.latency_buckets if o else None),
                )
            self._routes[snap.instance] = windows
        if snap.service == "inference":
            old_actors = {a.name: a for a in (before.actors if before else [])}
            w = Window()
            for a in _inference_actors(snap.actors):
                oa = old_actors.get(a.name)
                w.add(
                    seconds,
                    _delta(a.requests, oa.requests if oa else None),
                    _delta(a.errors, oa.errors if oa else None),
                    _delta_list(a.latency_buckets, oa.latency_buckets if oa else None),
                )
            self._pool[snap.instance] = w

    def live(self, now: float) -> list[MetricsSnapshot]:
        """The latest snapshot of every instance still alive; forgets the others."""
        out = []
        for instance, snap in list(self._last.items()):
            if now - snap.ts > STALE_AFTER_INTERVALS * max(snap.interval_s, 0.1) or snap.state == "stopped":
                del self._last[instance]
                self._routes.pop(instance, None)
                self._pool.pop(instance, None)
            else:
                out.append(snap)
        return out

    def variants(self, now: float) -> dict[str, Window]:
        """``model@version`` → its window, summed over the live routers."""
        live = {s.instance for s in self.live(now)}
        out: dict[str, Window] = {}
        for instance, windows in self._routes.items():
            if instance not in live:
                continue
            for (model, version), w in windows.items():
                total = out.setdefault(f"{model}@{version}", Window())
                total.add(w.seconds, w.requests, w.errors, _cumulative(w.buckets))
        return out

    def pool(self, now: float, service: str = "inference") -> PoolLoad:
        snaps = [s for s in self.live(now) if s.service == service and s.state in SERVING_STATES]
        in_flight = sum(a.in_flight + a.queued for s in snaps for a in _inference_actors(s.actors))
        requests = sum(a.requests for s in snaps for a in _inference_actors(s.actors))
        total = Window()
        for s in snaps:
            w = self._pool.get(s.instance)
            if w is not None:
                total.add(w.seconds, w.requests, w.errors, _cumulative(w.buckets))
        return PoolLoad(
            replicas=len(snaps), in_flight=in_flight, requests_total=requests, p99_ms=total.quantile_ms(0.99)
        )


def _inference_actors(actors: list[ActorStats]) -> list[ActorStats]:
    return [a for a in actors if a.name.startswith(("infer-", "durable-", "generate-"))]


def _cumulative(buckets: list[int]) -> list[int]:
    out, total = [], 0
    for c in buckets:
        total += c
        out.append(total)
    return out
