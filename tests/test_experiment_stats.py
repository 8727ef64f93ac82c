"""The A/B statistics engine (services/metrics/stats.py): accumulators, verdicts, and the
sequential test's error bound under peeking, against simulated traffic with fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.metrics.stats import Experiment, VariantStats, is_error
from shared.schemas import ExperimentReport, Guardrails, Split, Variant, VariantReport

ALPHA = 0.05


def _split(*versions: str, guardrails: Guardrails | None = None) -> Split:
    weight = 1.0 / len(versions)
    return Split(
        model="m",
        experiment="e1",
        variants=[Variant(version=v, weight=weight) for v in versions],
        guardrails=guardrails,
    )


def _feed(stats: VariantStats, values: np.ndarray) -> None:
    """A batch summarised by numpy, merged in one step (as fast as the simulation needs)."""
    m = float(values.mean())
    stats.merge_rewards(len(values), m, float(((values - m) ** 2).sum()))


def _report_for(report: ExperimentReport, version: str) -> VariantReport:
    return next(v for v in report.variants if v.version == version)


# -- accumulators -----------------------------------------------------------------------------


def test_welford_mean_and_variance_match_numpy() -> None:
    x = np.random.default_rng(1).normal(1e6, 3.0, 5000)  # a large offset: naive sums would lose digits
    s = VariantStats()
    for v in x:
        s.record_reward(float(v))
    assert s.rewards == 5000
    assert s.reward_mean == pytest.approx(float(x.mean()), rel=1e-12)
    assert s.reward_variance == pytest.approx(float(x.var(ddof=1)), rel=1e-9)

    merged = VariantStats()
    for chunk in np.array_split(x, 7):
        _feed(merged, chunk)
    assert merged.rewards == s.rewards
    assert merged.reward_mean == pytest.approx(s.reward_mean, rel=1e-12)
    assert merged.reward_variance == pytest.approx(s.reward_variance, rel=1e-9)


@pytest.mark.parametrize(
    "sample",
    [
        np.random.default_rng(2).lognormal(math.log(0.02), 0.8, 20_000),
        np.random.default_rng(3).uniform(0.001, 0.5, 20_000),
        np.concatenate([np.random.default_rng(4).normal(0.005, 0.0005, 9_000), np.full(1_000, 2.0)]),
    ],
    ids=["lognormal", "uniform", "bimodal"],
)
def test_percentiles_are_within_5_percent_of_numpy(sample: np.ndarray) -> None:
    s = VariantStats()
    for v in sample:
        s.record_request(float(v), 200)
    for q in (0.5, 0.95, 0.99):
        assert s.quantile_ms(q) == pytest.approx(1000 * float(np.quantile(sample, q)), rel=0.05), q


def test_quantiles_of_nothing_and_of_one_value() -> None:
    s = VariantStats()
    assert s.quantile_ms(0.99) == 0.0
    s.record_request(0.123, 200)
    assert s.quantiles_ms((0.0, 0.5, 1.0)) == pytest.approx([123.0, 123.0, 123.0])


def test_errors_are_server_errors_and_overload() -> None:
    assert [c for c in (200, 400, 404, 422, 429, 500, 503, 504) if is_error(c)] == [429, 500, 503, 504]
    s = VariantStats()
    for code in (200, 404, 429, 500):
        s.record_request(0.01, code)
    assert (s.requests, s.errors, s.error_rate) == (4, 2, 0.5)


def test_reward_interval_covers_the_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(400):
        s = VariantStats()
        _feed(s, rng.normal(3.0, 2.0, 200))
        low, high = s.reward_ci()
        covered += low <= 3.0 <= high
    assert 0.92 <= covered / 400 <= 0.98
    one = VariantStats()
    one.record_reward(0.7)
    assert one.reward_ci() == (0.7, 0.7)


# -- verdicts ---------------------------------------------------------------------------------


def _run_bernoulli(p_control: float, p_candidate: float, per_arm: int, seed: int, every: int = 100) -> ExperimentReport:
    """Drive record_reward one reward at a time, looking every ``every`` rewards per arm; stop
    at the first decision."""
    rng = np.random.default_rng(seed)
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails(alpha=ALPHA))
    a = rng.random(per_arm) < p_control
    b = rng.random(per_arm) < p_candidate
    report = exp.evaluate(split, 0.0)
    for start in range(0, per_arm, every):
        for x, y in zip(a[start : start + every], b[start : start + every], strict=True):
            exp.variant("1").record_reward(float(x))
            exp.variant("2").record_reward(float(y))
        report = exp.evaluate(split, float(start))
        if report.verdict != "waiting":
            break
    return report


def test_a_better_candidate_is_promoted() -> None:
    report = _run_bernoulli(0.10, 0.13, 20_000, seed=6)
    assert report.verdict == "promote"
    assert report.winner == "2"
    cand = _report_for(report, "2")
    assert cand.p_value <= ALPHA and cand.lift > 0
    assert report.reason.startswith("candidate 2: reward ")
    assert f"{cand.rewards} rewards" in report.reason and "alpha 0.05" in report.reason


def test_a_worse_candidate_is_rolled_back() -> None:
    rng = np.random.default_rng(7)
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails())
    for _ in range(100):
        _feed(exp.variant("1"), rng.normal(1.0, 1.0, 50))
        _feed(exp.variant("2"), rng.normal(0.8, 1.0, 50))
        report = exp.evaluate(split, 1.0)
        if report.verdict != "waiting":
            break
    assert report.verdict == "rollback"
    assert report.winner == "1"
    assert "candidate 2: worse than the control" in report.reason
    assert _report_for(report, "2").lift < 0


def test_equal_variants_keep_waiting() -> None:
    rng = np.random.default_rng(8)
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails())
    verdicts = set()
    for _ in range(100):  # 5,000 rewards per arm, a look every 50
        _feed(exp.variant("1"), (rng.random(50) < 0.1).astype(float))
        _feed(exp.variant("2"), (rng.random(50) < 0.1).astype(float))
        report = exp.evaluate(split, 1.0)
        verdicts.add(report.verdict)
    assert verdicts == {"waiting"}
    assert exp.variant("2").rewards == 5000
    assert report.reason.startswith("no significant difference yet: candidate 2: lift ")
    assert "> alpha 0.05 after 5000 / 5000 rewards" in report.reason


def test_no_verdict_before_min_samples() -> None:
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails(min_samples=200))
    _feed(exp.variant("1"), np.zeros(199))
    _feed(exp.variant("2"), np.ones(150))
    report = exp.evaluate(split, 5.0)
    assert report.verdict == "waiting"
    assert report.reason == "waiting for 200 rewards per variant (min_samples): 1 has 199, 2 has 150"
    assert _report_for(report, "2").p_value == 1.0
    assert (report.min_samples, report.alpha, report.updated_at) == (200, 0.05, 5.0)


def test_error_rate_guardrail_rolls_back_with_the_numbers() -> None:
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails(max_error_rate=0.05, min_requests=100))
    cand = exp.variant("2")
    for i in range(99):
        cand.record_request(0.01, 500 if i < 10 else 200)
    assert exp.evaluate(split, 0.0).verdict == "waiting"  # under min_requests: not yet judged
    for _ in range(21):
        cand.record_request(0.01, 200)
    report = exp.evaluate(split, 0.0)
    assert report.verdict == "rollback"
    assert report.winner == "1"
    assert report.reason == "candidate 2: error rate 0.083 over the guardrail 0.05 after 120 requests"
    assert _report_for(report, "2").guardrail == "max_error_rate"
    assert _report_for(report, "1").guardrail == ""


def test_p99_guardrail_rolls_back_with_the_numbers() -> None:
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails(max_p99_ms=500.0))
    for v in np.random.default_rng(9).uniform(0.7, 0.9, 200):  # 700–900 ms
        exp.variant("2").record_request(float(v), 200)
        exp.variant("1").record_request(float(v) / 10, 200)
    report = exp.evaluate(split, 0.0)
    assert report.verdict == "rollback"
    assert report.reason.startswith("candidate 2: p99 8")
    assert report.reason.endswith(" ms over the guardrail 500 ms after 200 requests")
    assert _report_for(report, "2").guardrail == "max_p99_ms"


def test_a_decided_split_passes_its_state_through() -> None:
    exp = Experiment("m", "e1")
    _feed(exp.variant("1"), np.zeros(300))
    _feed(exp.variant("2"), np.ones(300))
    for state, top in (("promoted", "2"), ("rolled_back", "1")):
        split = Split(
            model="m",
            experiment="e1",
            variants=[Variant(version="1", weight=float(top == "1")), Variant(version="2", weight=float(top == "2"))],
            guardrails=Guardrails(),
            state=state,
            decided_at="2025-01-01T00:00:00Z",
        )
        report = exp.evaluate(split, 0.0)
        assert (report.verdict, report.state, report.winner) == (state, state, top)
        assert report.reason.startswith(f"experiment already {state.replace('_', ' ')} at 2025-01-01T00:00:00Z")
        assert _report_for(report, "2").rewards == 300


def test_without_guardrails_it_only_reports() -> None:
    rng = np.random.default_rng(10)
    exp = Experiment("m", "e1")
    _feed(exp.variant("1"), rng.normal(0.0, 1.0, 1000))
    _feed(exp.variant("2"), rng.normal(1.0, 1.0, 1000))
    report = exp.evaluate(_split("1", "2"), 0.0)
    assert (report.verdict, report.reason) == ("waiting", "no guardrails: report only")
    assert _report_for(report, "2").p_value < 1e-6  # still computed
    assert _report_for(report, "1").p_value == 1.0
    assert (report.min_samples, report.alpha) == (Guardrails().min_samples, Guardrails().alpha)


def test_a_significant_lift_under_min_reward_lift_keeps_waiting() -> None:
    rng = np.random.default_rng(11)
    exp = Experiment("m", "e1")
    _feed(exp.variant("1"), rng.normal(0.0, 1.0, 20_000))
    _feed(exp.variant("2"), rng.normal(0.1, 1.0, 20_000))
    report = exp.evaluate(_split("1", "2", guardrails=Guardrails(min_reward_lift=0.5)), 0.0)
    assert report.verdict == "waiting"
    assert "is significant" in report.reason and "under min_reward_lift 0.5" in report.reason


def test_with_several_candidates_the_highest_significant_lift_wins() -> None:
    rng = np.random.default_rng(12)
    exp = Experiment("m", "e1")
    for version, mean in (("1", 0.0), ("2", 0.3), ("3", 0.5), ("4", 0.0)):
        _feed(exp.variant(version), rng.normal(mean, 1.0, 2000))
    report = exp.evaluate(_split("1", "2", "3", "4", guardrails=Guardrails()), 0.0)
    assert (report.verdict, report.winner) == ("promote", "3")


def test_variants_outside_the_split_are_reported_but_do_not_decide() -> None:
    rng = np.random.default_rng(13)
    exp = Experiment("m", "e1")
    _feed(exp.variant("1"), rng.normal(0.0, 1.0, 1000))
    _feed(exp.variant("2"), rng.normal(0.0, 1.0, 1000))
    _feed(exp.variant("9"), rng.normal(5.0, 1.0, 1000))
    report = exp.evaluate(_split("1", "2", guardrails=Guardrails()), 0.0)
    assert [v.version for v in report.variants] == ["1", "2", "9"]
    assert _report_for(report, "9").weight == 0.0
    assert report.verdict == "waiting"


def test_another_experiments_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split m/e2 evaluated by experiment m/e1"):
        Experiment("m", "e1").evaluate(Split(model="m", experiment="e2", variants=[]), 0.0)


def test_the_p_value_never_rises_between_looks() -> None:
    rng = np.random.default_rng(14)
    exp = Experiment("m", "e1")
    split = _split("1", "2", guardrails=Guardrails())
    seen = []
    for _ in range(60):
        _feed(exp.variant("1"), rng.normal(0.0, 1.0, 50))
        _feed(exp.variant("2"), rng.normal(0.05, 1.0, 50))
        seen.append(exp.evaluate(split, 0.0).variants[1].p_value)
    assert seen == sorted(seen, reverse=True)
    assert seen[0] == 1.0 and seen[-1] < 1.0


# -- the reason for a sequential test ---------------------------------------------------------


def test_peeking_keeps_false_promotions_under_alpha_where_a_naive_z_test_does_not() -> None:
    """No true difference, 200 runs, a look every 50 rewards per arm up to 2,000: the mSPRT
    promotes (or rolls back) in at most ~alpha of the runs; a fixed-horizon z-test (|z| > 1.96)
    applied at the same looks, from min_samples on, "finds" a difference far more often."""
    runs, looks, every = 200, 40, 50
    rng = np.random.default_rng(15)
    g = Guardrails(alpha=ALPHA)
    split = _split("1", "2", guardrails=g)
    promoted = decided = naive_promoted = naive_decided = 0
    for _ in range(runs):
        a = (rng.random((looks, every)) < 0.1).astype(float)
        b = (rng.random((looks, every)) < 0.1).astype(float)
        exp = Experiment("m", "e1")
        control, candidate = exp.variant("1"), exp.variant("2")
        verdict, naive = "waiting", 0.0
        for k in range(looks):
            _feed(control, a[k])
            _feed(candidate, b[k])
            if verdict == "waiting":
                verdict = exp.evaluate(split, 0.0).verdict
            if control.rewards >= g.min_samples and not naive:
                se = math.sqrt(
                    control.reward_variance / control.rewards + candidate.reward_variance / candidate.rewards
                )
                z = (candidate.reward_mean - control.reward_mean) / se if se else 0.0
                naive = z if abs(z) > 1.96 else 0.0
        promoted += verdict == "promote"
        decided += verdict != "waiting"
        naive_promoted += naive > 0
        naive_decided += naive != 0
    assert promoted / runs <= ALPHA + 0.03
    assert decided / runs <= ALPHA + 0.03
    assert naive_decided / runs > 2 * ALPHA  # peeking at a fixed-horizon test: the error bound is gone
    assert naive_promoted > promoted and naive_decided > decided
