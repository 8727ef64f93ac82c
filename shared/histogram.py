"""A fixed-bucket latency histogram, cheap enough to update on every message.

Bucket bounds follow Prometheus conventions (upper bounds, cumulative on export) so the metrics
service can expose them as a native ``_bucket`` series without re-binning.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds: 100 µs to 60 s, roughly ×2.5 per step.
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BOUNDS_S)


class LatencyHistogram:
    __slots__ = ("count", "counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_NS) + 1)  # the last bucket is +Inf
        self.count = 0
        self.sum_ns = 0

    def observe_ns(self, value_ns: int) -> None:
        self.counts[bisect_left(_BOUNDS_NS, value_ns)] += 1
        self.count += 1
        self.sum_ns += value_ns

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def quantile_s(self, q: float) -> float:
        """An upper-bound estimate of quantile ``q`` (the bucket bound it falls in)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        for bound, cum in zip((*LATENCY_BOUNDS_S, float("inf")), self.cumulative(), strict=True):
            if cum >= rank:
                return bound
        return float("inf")
