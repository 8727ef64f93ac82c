"""What the router counts per request (pure: no NATS, no HTTP).

- :class:`RouteCounters`: requests, errors by status code and a latency histogram per model and
  served version, published in the router's metric snapshots (Prometheus ``aimesh_gateway_*``).
  Labels are bounded (:func:`route_labels`): only deployed models and their deployed versions
  are named, every other name a client sends is counted under ``_other``, so no request can add
  a series (nor a counter in this process).
- :class:`ExposureLog`: for requests routed by an experiment, which variant served which
  request id, how fast and how it ended; taken in batches by the service, which publishes them
  to the events stream, where the metrics service joins feedback to variants.  Bounded: when the
  stream cannot take them (NATS away), the oldest are dropped and counted, never an unbounded
  queue on the request path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from shared.histogram import LatencyHistogram
from shared.routing import RoutingTable
from shared.schemas import Exposure, RouteStats

OTHER = "_other"  # the one label value of every model or version that is not deployed

Deployed = Mapping[str, Collection[str]]  # model → the versions it serves


def route_labels(model: str, version: str, deployed: Deployed) -> tuple[str, str]:
    """The (model, version) labels a request is counted under: a deployed model keeps its name
    and a version it serves keeps its own; anything else (a name a client made up, a version
    not deployed) is ``_other``."""
    versions = deployed.get(model)
    if versions is None:
        return OTHER, OTHER
    return model, version if version in versions else OTHER


def deployed_versions(table: RoutingTable) -> dict[str, set[str]]:
    """What the routing table serves: each deployment's version and the one it replaced (the
    fallback while the new one loads), and the variants, mirrors and control of each model's split."""
    out: dict[str, set[str]] = {}
    for d in table.deployments.values():
        out.setdefault(d.model, set()).update(v for v in (d.version, d.previous) if v)
    for model, split in table.splits.items():
        versions = out.setdefault(model, set())
        versions.update(v.version for v in split.variants)
        versions.update(m.version for m in split.mirrors)
        versions.update([split.control] if split.control else [])
    return out


@dataclass(slots=True)
class _Route:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    hedged: int = 0
    hedges_won: int = 0


class RouteCounters:
    """Counters per (model, version) label pair; ``deployed`` says what is deployed now (see
    :func:`route_labels`; None: every name is its own label, for tests of the counting alone)."""

    def __init__(self, deployed: Callable[[], Deployed] | None = None) -> None:
        self._routes: dict[tuple[str, str], _Route] = {}
        self._deployed = deployed

    def record(self, model: str, version: str, code: int, latency_s: float) -> None:
        if self._deployed is not None:
            model, version = route_labels(model, version, self._deployed())
        route = self._route(model, version)
        route.requests += 1
        if code >= 400:
            key = str(code)
            route.errors[key] = route.errors.get(key, 0) + 1
        route.latency.observe_ns(int(latency_s * 1e9))

    def record_hedge(self, model: str, version: str, won: bool) -> None:
        """A hedge sent for ``model@version`` (``won`` False), or one that answered first."""
        if self._deployed is not None:
            model, version = route_labels(model, version, self._deployed())
        route = self._route(model, version)
        if won:
            route.hedges_won += 1
        else:
            route.hedged += 1

    def _route(self, model: str, version: str) -> _Route:
        route = self._routes.get((model, version))
        if route is None:
            route = self._routes[(model, version)] = _Route()
        return route

    def stats(self) -> list[RouteStats]:
        return [
            RouteStats(
                model=model,
                version=version,
                requests=r.requests,
                errors=dict(r.errors),
                latency_buckets=r.latency.cumulative(),
                latency_sum_s=r.latency.sum_ns / 1e9,
                hedged=r.hedged,
                hedges_won=r.hedges_won,
            )
            for (model, version), r in sorted(self._routes.items())
        ]


class ExposureLog:
    def __init__(self, max_pending: int = 20_000, batch_size: int = 1_000) -> None:
        self.max_pending = max_pending
        self.batch_size = batch_size
        self._pending: deque[Exposure] = deque()
        self.recorded = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def record(
        self, *, request_id: str, model: str, variant: str, experiment: str, latency_s: float, code: int
    ) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(
            Exposure(
                id=request_id,
                model=model,
                variant=variant,
                experiment=experiment,
                latency_s=latency_s,
                code=code,
                ts=time.time(),
            )
        )
        self.recorded += 1

    def take(self) -> dict[str, list[Exposure]]:
        """Up to ``batch_size`` pending exposures, grouped by model (one subject each)."""
        out: dict[str, list[Exposure]] = {}
        for _ in range(min(self.batch_size, len(self._pending))):
            exposure = self._pending.popleft()
            out.setdefault(exposure.model, []).append(exposure)
        return out

    def put_back(self, exposures: list[Exposure]) -> None:
        """A batch that could not be published goes back to the front (within the bound)."""
        room = self.max_pending - len(self._pending)
        keep = exposures[-room:] if room > 0 else []
        self.dropped += len(exposures) - len(keep)
        self._pending.extendleft(reversed(keep))
