"""The latency histogram's quantiles and cumulative counts (shared/histogram.py)."""

from __future__ import annotations

from shared.histogram import LatencyHistogram


def test_histogram_quantiles_are_bucket_upper_bounds() -> None:
    h = LatencyHistogram()
    for _ in range(90):
        h.observe_ns(200_000)  # 0.2 ms
    for _ in range(10):
        h.observe_ns(40_000_000)  # 40 ms
    assert h.quantile_s(0.5) == 0.00025
    assert h.quantile_s(0.99) == 0.05
    assert h.cumulative()[-1] == 100
