"""The autoscaling policy of a worker pool (pure: no NATS, no asyncio, no clock of its own).

``Autoscaler.decide(now, observation)`` is called once per metrics tick and returns the pool's
target as a ``ScaleDecision``; the caller publishes it and the supervisor carries it out.

Demand is ``ceil(max(in_flight / target_in_flight, lag / target_lag))`` workers, one more than
that (and than the current target) while p99 is over ``p99_ceiling_ms`` under load, within
``[min_replicas, max_replicas]``.  Hysteresis, so a pool does not flap on noisy samples:

- **up** at once, but not within ``up_cooldown_s`` of the last change (new workers need time to
  start and take load before the next sample means anything);
- **down** only after demand stayed below the target for ``down_cooldown_s``, and then to the
  highest demand seen in that window, not to the latest (quietest) sample;
- **to zero** only when ``min_replicas`` is 0 and the pool has been idle (no new requests,
  nothing in flight, nothing queued) for ``idle_to_zero_s``; until then one worker stays;
- **from zero** at once, cooldown or not: a queued durable request must get a worker.

The policy's own target, not the observed replica count, is what it holds to: workers that are
still starting (not yet counted) are not asked to stop on the next tick.  The first observation
seeds the target, so a metrics service that restarts adopts the pool as it finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.config import AutoscaleConfig
from shared.errors import ConfigError
from shared.schemas import ScaleDecision


def _short(x: float) -> str:
    """A number for a reason (seconds, ms): one decimal at most, so ``2.0001`` reads ``2``."""
    return f"{round(x, 1):g}"


@dataclass(frozen=True)
class PoolObservation:
    """The pool as the metrics service sees it at one tick."""

    replicas: int  # live instances of the pool seen now
    in_flight: int  # inference requests running + queued across the pool's workers
    lag: int  # durable requests waiting (consumers' pending + ack pending, or the stream's messages)
    requests_total: int  # cumulative requests served by the pool (idleness is its not changing)
    p99_ms: float | None  # recent p99 latency, if known


class Autoscaler:
    """The hysteresis state of one pool's policy; ``decide`` is its only entry point."""

    def __init__(self, policy: AutoscaleConfig) -> None:
        if policy.min_replicas < 0 or policy.max_replicas < max(policy.min_replicas, 1):
            raise ConfigError(
                f"autoscale: min_replicas {policy.min_replicas} / max_replicas {policy.max_replicas}: "
                "need 0 <= min_replicas <= max_replicas and max_replicas >= 1 ([autoscale] / AIMESH_AUTOSCALE_*)"
            )
        if policy.target_in_flight <= 0 or policy.target_lag <= 0:
            raise ConfigError(
                f"autoscale: target_in_flight {policy.target_in_flight:g} and target_lag {policy.target_lag:g} "
                "must be above 0: they are loads per worker ([autoscale] / AIMESH_AUTOSCALE_*)"
            )
        self.policy = policy
        self.target: int | None = None  # what this policy last asked for; None before the first tick
        self._last_change: float | None = None
        self._below_since: float | None = None  # demand below the target since then
        self._below_peak = 0  # the highest demand seen while below
        self._idle_since: float | None = None
        self._requests_total: int | None = None

    def decide(self, now: float, obs: PoolObservation) -> ScaleDecision:
        """The pool's target at ``now`` (seconds on any steady clock; it becomes the decision's ``ts``)."""
        p = self.policy
        held = obs.replicas if self.target is None else self.target
        idle_s = self._track_idle(now, obs)
        demand, why = self._demand(obs, held)

        if held > 0 and p.min_replicas == 0 and idle_s is not None and idle_s >= p.idle_to_zero_s:
            return self._change(
                now, obs, 0, f"idle {_short(idle_s)}s (no new requests, nothing in flight or queued) → 0"
            )

        desired, why = self._bounded(demand, held, why)
        if desired > held:
            return self._scale_up(now, obs, held, desired, why)
        if desired < held:
            return self._scale_down(now, obs, held, desired, why)
        self._below_since = None
        return self._hold(now, obs, held, why)

    # -- the parts ----------------------------------------------------------------------------------
    def _bounded(self, demand: int, held: int, why: str) -> tuple[int, str]:
        """``demand`` within the pool's bounds, and why."""
        p = self.policy
        floor = p.min_replicas
        if floor == 0 and held > 0:
            floor = 1  # zero only through idleness (decide): a pool between requests keeps a worker
        desired = min(max(demand, floor), p.max_replicas)
        if desired > demand:
            why += (
                f", raised to min {desired}"
                if floor == p.min_replicas
                else f", one kept until idle {p.idle_to_zero_s:g}s"
            )
        elif desired < demand:
            why += f", capped at max {p.max_replicas}"
        return desired, why

    def _scale_up(self, now: float, obs: PoolObservation, held: int, desired: int, why: str) -> ScaleDecision:
        """Up at once from zero or below the minimum, else after the up cooldown."""
        p = self.policy
        self._below_since = None
        if held == 0:
            return self._change(now, obs, desired, f"from zero: {why}")
        if held < p.min_replicas:
            return self._change(now, obs, desired, f"below min: {why}")
        since = None if self._last_change is None else now - self._last_change
        if since is not None and since < p.up_cooldown_s:
            return self._hold(
                now, obs, held, f"{why}; up cooldown ({_short(since)}s of {p.up_cooldown_s:g}s since last change)"
            )
        return self._change(now, obs, desired, why)

    def _scale_down(self, now: float, obs: PoolObservation, held: int, desired: int, why: str) -> ScaleDecision:
        """Down at once above the maximum, else once demand has stayed lower for the down cooldown,
        to the highest demand seen meanwhile."""
        p = self.policy
        if held > p.max_replicas:
            return self._change(now, obs, desired, why)
        if self._below_since is None:
            self._below_since, self._below_peak = now, desired
        self._below_peak = max(self._below_peak, desired)
        below_s = now - self._below_since
        if below_s < p.down_cooldown_s:
            return self._hold(
                now, obs, held, f"{why}; down cooldown ({_short(below_s)}s of {p.down_cooldown_s:g}s lower)"
            )
        peak = self._below_peak
        return self._change(now, obs, peak, f"{why}; {_short(below_s)}s lower, highest demand meanwhile {peak}")

    def _demand(self, obs: PoolObservation, held: int) -> tuple[int, str]:
        """Workers the load asks for, and why in numbers."""
        p = self.policy
        by_flight = math.ceil(obs.in_flight / p.target_in_flight) if obs.in_flight > 0 else 0
        by_lag = math.ceil(obs.lag / p.target_lag) if obs.lag > 0 else 0
        if by_flight == 0 and by_lag == 0:
            return 0, "no load"
        if by_lag > by_flight:
            demand, why = by_lag, f"lag {obs.lag} over target {p.target_lag:g}/worker → {by_lag}"
        else:
            demand, why = (
                by_flight,
                f"in flight {obs.in_flight} over target {p.target_in_flight:g}/worker → {by_flight}",
            )
        if p.p99_ceiling_ms is not None and obs.p99_ms is not None and obs.p99_ms > p.p99_ceiling_ms:
            demand = max(demand, held) + 1
            why += f", p99 {_short(obs.p99_ms)}ms over ceiling {p.p99_ceiling_ms:g}ms → {demand}"
        return demand, why

    def _track_idle(self, now: float, obs: PoolObservation) -> float | None:
        """Seconds since the pool was last seen busy (or first seen), None while it is busy.  A
        falling total is a worker gone or restarted (its counters with it), not traffic."""
        served = self._requests_total is not None and obs.requests_total > self._requests_total
        self._requests_total = obs.requests_total
        if served or obs.in_flight > 0 or obs.lag > 0:
            self._idle_since = now  # busy at this sample: idle, if at all, from here on
            return None
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since

    def _change(self, now: float, obs: PoolObservation, desired: int, reason: str) -> ScaleDecision:
        if desired != self.target:
            self._last_change = now
        self.target = desired
        self._below_since = None
        return ScaleDecision(pool=self.policy.pool, desired=desired, current=obs.replicas, reason=reason, ts=now)

    def _hold(self, now: float, obs: PoolObservation, held: int, reason: str) -> ScaleDecision:
        self.target = held
        return ScaleDecision(
            pool=self.policy.pool, desired=held, current=obs.replicas, reason=f"{reason}; keep {held}", ts=now
        )
