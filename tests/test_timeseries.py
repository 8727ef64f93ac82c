"""The metrics service's History: a bounded window of series per metric and key
(services/metrics/timeseries.py)."""

from __future__ import annotations

from services.metrics.timeseries import History


def test_history_keeps_only_the_last_keep_s() -> None:
    history = History(keep_s=60)
    for t in range(200):
        history.add(1000.0 + t, "rps", "digits@1", float(t))
    points = history.snapshot()["rps"]["digits@1"]
    assert points[0] == (1000.0 + 139, 139.0)
    assert points[-1] == (1000.0 + 199, 199.0)
    assert len(points) == 61


def test_history_snapshot_since_and_series_that_aged_out_disappear() -> None:
    history = History(keep_s=30)
    history.add(100.0, "replicas", "old-pool", 1)
    for t in range(100, 140):
        history.add(float(t), "rps", "digits@1", 1.0)
    snapshot = history.snapshot(since=135.0)
    assert [ts for ts, _ in snapshot["rps"]["digits@1"]] == [135.0, 136.0, 137.0, 138.0, 139.0]
    assert "replicas" not in snapshot  # its only point is older than the window
    assert len(history) == 1


def test_history_puts_a_late_point_in_its_place() -> None:
    history = History(keep_s=100)
    for ts in (10.0, 11.0, 13.0):
        history.add(ts, "p99_ms", "digits@2", ts)
    history.add(12.0, "p99_ms", "digits@2", 12.0)
    assert [ts for ts, _ in history.snapshot()["p99_ms"]["digits@2"]] == [10.0, 11.0, 12.0, 13.0]


def test_history_caps_keys_by_dropping_the_least_recently_updated() -> None:
    history = History(keep_s=100, max_keys=3)
    history.add(1.0, "rps", "a@1", 1)
    history.add(1.0, "rps", "b@1", 1)
    history.add(1.0, "rps", "c@1", 1)
    history.add(2.0, "rps", "a@1", 2)  # a is fresh again: b is now the stalest
    history.add(2.0, "rps", "d@1", 1)
    assert sorted(history.snapshot()["rps"]) == ["a@1", "c@1", "d@1"]
    assert history.dropped_keys == 1
    for i in range(50):
        history.add(3.0, "rps", f"user-{i}@1", 1)
    assert len(history) == 3
    assert history.dropped_keys == 51
