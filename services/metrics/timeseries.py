"""The dashboard's time series: a few minutes of per-tick figures, bounded in time and in keys.

The metrics service adds one point per metric and key every tick (``("rps", "digits@2", 41.5)``,
``("replicas", "inference", 2)``); the dashboard reads a snapshot.  Keys come from the traffic
(model@version), so their number is capped: past ``max_keys`` the least recently updated series
is dropped and counted, and a series whose points have all aged out disappears.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

Point = tuple[float, float]


class History:
    """Points newer than ``keep_s`` (relative to the newest point added) for at most ``max_keys``
    (metric, key) series.  Pure and single-threaded: the service adds and reads on its loop."""

    def __init__(self, keep_s: float, max_keys: int = 500) -> None:
        if keep_s <= 0:
            raise ValueError(f"keep_s must be positive, got {keep_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.keep_s = keep_s
        self.max_keys = max_keys
        self.dropped_keys = 0  # series evicted to stay under max_keys
        self._series: OrderedDict[tuple[str, str], deque[Point]] = OrderedDict()  # least recently updated first
        self._latest = float("-inf")

    def __len__(self) -> int:
        return len(self._series)

    def add(self, ts: float, metric: str, key: str, value: float) -> None:
        """Record ``value`` at ``ts``.  Points normally come in time order; a late one is put in
        its place, and one already older than the window is ignored."""
        self._latest = max(self._latest, ts)
        horizon = self._latest - self.keep_s
        if ts < horizon:
            return
        name = (metric, key)
        points = self._series.get(name)
        if points is None:
            if len(self._series) >= self.max_keys:
                self._series.popitem(last=False)
                self.dropped_keys += 1
            points = self._series[name] = deque()
        else:
            self._series.move_to_end(name)
        point = (ts, float(value))
        if not points or ts >= points[-1][0]:
            points.append(point)
        else:
            bisect.insort(points, point)
        _trim(points, horizon)

    def snapshot(self, since: float | None = None) -> dict[str, dict[str, list[Point]]]:
        """``{metric: {key: [(ts, value), ...]}}`` of the points at or after ``since`` (all kept
        points when None), oldest first; series left empty by age are forgotten on the way."""
        horizon = self._latest - self.keep_s
        start = horizon if since is None else max(since, horizon)
        out: dict[str, dict[str, list[Point]]] = {}
        for name in list(self._series):
            points = self._series[name]
            _trim(points, horizon)
            if not points:
                del self._series[name]
                continue
            chosen = list(points) if points[0][0] >= start else [p for p in points if p[0] >= start]
            if chosen:
                metric, key = name
                out.setdefault(metric, {})[key] = chosen
        return out


def _trim(points: deque[Point], horizon: float) -> None:
    while points and points[0][0] < horizon:
        points.popleft()
