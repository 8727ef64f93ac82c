"""The autoscaling policy, rule by rule, on synthetic observations at explicit times."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.metrics.autoscale import Autoscaler, PoolObservation
from shared.config import AutoscaleConfig
from shared.errors import ConfigError

POLICY = AutoscaleConfig(
    min_replicas=1,
    max_replicas=4,
    target_in_flight=16.0,
    target_lag=64.0,
    up_cooldown_s=5.0,
    down_cooldown_s=30.0,
    idle_to_zero_s=60.0,
)


def policy(**changes: Any) -> AutoscaleConfig:
    return msgspec.structs.replace(POLICY, **changes)


def obs(
    replicas: int, in_flight: int = 0, lag: int = 0, total: int = 0, p99_ms: float | None = None
) -> PoolObservation:
    return PoolObservation(replicas=replicas, in_flight=in_flight, lag=lag, requests_total=total, p99_ms=p99_ms)


def test_desired_is_the_larger_of_in_flight_and_lag_per_worker() -> None:
    d = Autoscaler(policy(max_replicas=10)).decide(0.0, obs(1, in_flight=40, lag=100))
    assert (d.desired, d.current, d.pool, d.ts) == (3, 1, "inference", 0.0)  # ceil(40/16)=3 > ceil(100/64)=2
    assert "in flight 40 over target 16/worker → 3" in d.reason

    d = Autoscaler(policy(max_replicas=10)).decide(0.0, obs(1, in_flight=10, lag=300))
    assert d.desired == 5
    assert "lag 300 over target 64/worker → 5" in d.reason


def test_desired_is_capped_at_max_with_the_numbers_in_the_reason() -> None:
    d = Autoscaler(POLICY).decide(0.0, obs(2, lag=300))
    assert d.desired == 4
    assert d.reason.startswith("lag 300 over target 64/worker → 5, capped at max 4")


def test_desired_is_raised_to_min() -> None:
    d = Autoscaler(policy(min_replicas=2)).decide(0.0, obs(2, in_flight=1))
    assert d.desired == 2
    assert "raised to min 2" in d.reason


def test_below_min_is_corrected_at_once_even_in_cooldown() -> None:
    scaler = Autoscaler(policy(min_replicas=2))
    assert scaler.decide(0.0, obs(1, in_flight=1)).desired == 2  # first change
    assert scaler.decide(1.0, obs(2, lag=64 * 3)).desired == 2  # up cooldown holds
    assert scaler.decide(5.0, obs(2, lag=64 * 3)).desired == 3


def test_p99_over_ceiling_under_load_adds_one() -> None:
    scaler = Autoscaler(policy(p99_ceiling_ms=100.0))
    d = scaler.decide(0.0, obs(2, in_flight=16, p99_ms=250.0))
    assert d.desired == 3  # demand 1, but latency says the 2 running are too few
    assert "p99 250ms over ceiling 100ms → 3" in d.reason
    # Still slow after the cooldown: one more again, up to max.
    assert scaler.decide(5.0, obs(3, in_flight=16, p99_ms=250.0)).desired == 4
    assert scaler.decide(10.0, obs(4, in_flight=16, p99_ms=250.0)).desired == 4


def test_p99_without_load_or_under_ceiling_adds_nothing() -> None:
    assert Autoscaler(policy(p99_ceiling_ms=100.0)).decide(0.0, obs(1, p99_ms=900.0)).desired == 1
    assert Autoscaler(policy(p99_ceiling_ms=100.0)).decide(0.0, obs(1, in_flight=16, p99_ms=99.0)).desired == 1
    assert Autoscaler(policy(p99_ceiling_ms=None)).decide(0.0, obs(1, in_flight=16, p99_ms=900.0)).desired == 1


def test_scale_up_is_immediate_then_waits_for_the_up_cooldown() -> None:
    scaler = Autoscaler(policy(max_replicas=10))
    assert scaler.decide(0.0, obs(1)).desired == 1
    assert scaler.decide(1.0, obs(1, in_flight=32)).desired == 2  # at once
    held = scaler.decide(3.0, obs(1, in_flight=64))  # the new worker is not counted yet
    assert held.desired == 2
    assert "up cooldown (2s of 5s since last change)" in held.reason
    assert scaler.decide(6.0, obs(2, in_flight=64)).desired == 4


def test_target_is_kept_while_new_workers_start() -> None:
    """The observed count lags behind the target: the policy must not ask the starting ones to stop."""
    scaler = Autoscaler(POLICY)
    assert scaler.decide(0.0, obs(1, in_flight=48)).desired == 3
    d = scaler.decide(2.0, obs(1, in_flight=48))
    assert (d.desired, d.current) == (3, 1)


def test_scale_down_waits_for_the_down_cooldown_then_goes_to_the_window_peak() -> None:
    scaler = Autoscaler(POLICY)
    assert scaler.decide(0.0, obs(4, in_flight=64)).desired == 4
    assert scaler.decide(10.0, obs(4, in_flight=16, total=1)).desired == 4  # below since 10
    assert scaler.decide(20.0, obs(4, in_flight=40, total=2)).desired == 4  # demand 3, the window's peak
    d = scaler.decide(30.0, obs(4, in_flight=1, total=3))
    assert d.desired == 4
    assert "down cooldown (20s of 30s lower)" in d.reason
    d = scaler.decide(40.0, obs(4, in_flight=1, total=4))
    assert d.desired == 3  # not 1: demand was 3 during the window
    assert "30s lower, highest demand meanwhile 3" in d.reason
    # A new window starts after the change.
    assert scaler.decide(50.0, obs(3, in_flight=1, total=5)).desired == 3
    assert scaler.decide(80.0, obs(3, in_flight=1, total=6)).desired == 1


def test_one_quiet_sample_does_not_scale_down() -> None:
    scaler = Autoscaler(POLICY)
    assert scaler.decide(0.0, obs(3, in_flight=48)).desired == 3
    assert scaler.decide(10.0, obs(3, total=5)).desired == 3  # quiet
    assert scaler.decide(20.0, obs(3, in_flight=48, total=9)).desired == 3  # busy again: the window resets
    assert scaler.decide(35.0, obs(3, total=12)).desired == 3  # quiet since 35 only
    assert scaler.decide(64.0, obs(3, total=13)).desired == 3
    assert scaler.decide(65.0, obs(3, total=14)).desired == 1


def test_above_max_is_corrected_at_once() -> None:
    d = Autoscaler(POLICY).decide(0.0, obs(6, in_flight=200))
    assert d.desired == 4
    assert d.current == 6


def test_idle_pool_goes_to_zero_only_with_min_zero_after_idle_to_zero() -> None:
    scaler = Autoscaler(policy(min_replicas=0))
    assert scaler.decide(0.0, obs(2, total=100)).desired == 2  # idle from here
    d = scaler.decide(35.0, obs(2, total=100))
    assert d.desired == 1  # down after 30s, but one stays until idle long enough
    assert "one kept until idle 60s" in d.reason
    assert scaler.decide(59.0, obs(1, total=100)).desired == 1
    d = scaler.decide(60.0, obs(1, total=100))
    assert d.desired == 0
    assert d.reason.startswith("idle 60s (no new requests, nothing in flight or queued) → 0")
    assert scaler.decide(120.0, obs(0, total=0)).desired == 0  # a falling total is workers gone, not traffic


def test_with_min_one_an_idle_pool_never_goes_to_zero() -> None:
    scaler = Autoscaler(POLICY)
    assert scaler.decide(0.0, obs(1)).desired == 1
    assert scaler.decide(1000.0, obs(1)).desired == 1


def test_new_requests_restart_the_idle_clock() -> None:
    scaler = Autoscaler(policy(min_replicas=0))
    assert scaler.decide(0.0, obs(1, total=10)).desired == 1
    assert scaler.decide(50.0, obs(1, total=11)).desired == 1  # served one: not idle (in_flight was 0 at both samples)
    assert scaler.decide(100.0, obs(1, total=11)).desired == 1  # idle for 50s only
    assert scaler.decide(110.0, obs(1, total=11)).desired == 0


def test_queued_work_restarts_the_idle_clock() -> None:
    scaler = Autoscaler(policy(min_replicas=0))
    assert scaler.decide(0.0, obs(1)).desired == 1
    assert scaler.decide(50.0, obs(1, lag=1)).desired == 1
    assert scaler.decide(109.0, obs(1)).desired == 1  # idle since the busy sample at 50
    assert scaler.decide(110.0, obs(1)).desired == 0


def test_from_zero_any_lag_brings_a_worker_at_once_despite_the_cooldown() -> None:
    scaler = Autoscaler(policy(min_replicas=0, idle_to_zero_s=10.0))
    assert scaler.decide(0.0, obs(1)).desired == 1
    assert scaler.decide(10.0, obs(1)).desired == 0  # a change at 10
    d = scaler.decide(11.0, obs(0, lag=1))  # within the up cooldown of that change
    assert d.desired == 1
    assert d.reason.startswith("from zero: lag 1 over target 64/worker → 1")
    assert Autoscaler(policy(min_replicas=0)).decide(0.0, obs(0, lag=200)).desired == 4


def test_at_zero_without_load_stays_at_zero() -> None:
    scaler = Autoscaler(policy(min_replicas=0))
    assert scaler.decide(0.0, obs(0)).desired == 0
    assert scaler.decide(100.0, obs(0)).desired == 0


def test_first_observation_adopts_the_pool_as_found() -> None:
    d = Autoscaler(POLICY).decide(0.0, obs(3, in_flight=17))
    assert (d.desired, d.current) == (3, 3)  # demand 2 is lower, but not for 30s yet
    assert d.reason.endswith("keep 3")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas 3 / max_replicas 2"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas >= 1"),
        ({"target_lag": 0.0}, "target_lag 0 must be above 0"),
    ],
)
def test_impossible_policies_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Autoscaler(policy(**changes))
