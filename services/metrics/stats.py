"""A/B experiment statistics: per-variant accumulators and the sequential test (pure: no NATS,
no asyncio, no numpy).

Per variant (:class:`VariantStats`): requests, errors (a status ``>= 500``, or ``429``: the
variant failed or could not keep up; other 4xx are the caller's fault and say nothing about the
variant), a log-bucketed latency histogram fine enough for percentiles within ~2.5% (ratio 1.05
between 10 µs and 120 s, linear inside a bucket, clamped to the exact min and max), and the
rewards' count, mean and M2 by Welford's update (numerically stable, O(1) memory).

Per experiment (:class:`Experiment`): every candidate is compared with the control by the
normal-mixture mSPRT for a difference of two means (Johari, Koomen, Pekelis, Walsh, "Peeking at
A/B tests", KDD 2017).  With θ̂ = mean_B − mean_A, plug-in variance V = s²_A/n_A + s²_B/n_B and a
N(0, τ²) mixture over the true difference::

    Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))

The always-valid p-value is the running minimum of min(1, 1/Λ) over every look, kept here per
candidate: however often the metrics service evaluates, P(p ≤ α) stays ≤ α under "no
difference".  A fixed-horizon z-test looked at repeatedly does not (see bench/experiments.py).

τ² is fixed per candidate at its first look: ``min_reward_lift²`` when that is > 0 (the mixture
centres its power on the smallest lift worth acting on), else ``(0.1 · s_pooled)²``, a small
standardised effect (0.1 σ), which is the size of lift online experiments typically chase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.schemas import ExperimentReport, Guardrails, Split, VariantReport, Verdict

# Latency histogram: log-spaced buckets from 10 µs to 120 s, each 5% wider than the previous.
_LO_S = 1e-5
_HI_S = 120.0
_RATIO = 1.05
_LOG_RATIO = math.log(_RATIO)
_BUCKETS = math.ceil(math.log(_HI_S / _LO_S) / _LOG_RATIO)  # finite buckets; +1 under, +1 over

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
TAU_STANDARDISED = 0.1  # τ = 0.1 × pooled σ when no min_reward_lift is given


def is_error(code: int) -> bool:
    """A status that counts against the variant: server errors, and overload (429)."""
    return code >= 500 or code == 429


def _bucket_bounds(i: int) -> tuple[float, float]:
    if i == 0:
        return 0.0, _LO_S
    if i > _BUCKETS:
        return _LO_S * _RATIO**_BUCKETS, math.inf
    return _LO_S * _RATIO ** (i - 1), _LO_S * _RATIO**i


class VariantStats:
    """Mutable accumulator for one variant of one experiment."""

    __slots__ = ("_counts", "_m2", "_max_s", "_mean", "_min_s", "errors", "requests", "rewards")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rewards = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._counts = [0] * (_BUCKETS + 2)
        self._min_s = math.inf
        self._max_s = 0.0

    def record_request(self, latency_s: float, code: int) -> None:
        """Count one served request; it is an error when :func:`is_error` says so."""
        self.requests += 1
        if is_error(code):
            self.errors += 1
        x = latency_s if latency_s > 0.0 else 0.0  # negative (clock skew) or NaN → 0
        i = 0 if x < _LO_S else min(int(math.log(x / _LO_S) / _LOG_RATIO) + 1, _BUCKETS + 1)
        self._counts[i] += 1
        self._min_s = min(self._min_s, x)
        self._max_s = max(self._max_s, x)

    def record_reward(self, reward: float) -> None:
        """Welford's update of count, mean and M2 (the sum of squared deviations)."""
        self.rewards += 1
        delta = reward - self._mean
        self._mean += delta / self.rewards
        self._m2 += delta * (reward - self._mean)

    def merge_rewards(self, count: int, mean: float, m2: float) -> None:
        """Add a batch summarised elsewhere (count, mean, M2), by Chan et al.'s pairwise formula:
        the same result as recording its rewards one by one, for callers that aggregate."""
        if count <= 0:
            return
        n = self.rewards + count
        delta = mean - self._mean
        self._mean += delta * count / n
        self._m2 += m2 + delta * delta * self.rewards * count / n
        self.rewards = n

    @property
    def reward_mean(self) -> float:
        return self._mean

    @property
    def reward_variance(self) -> float:
        """The unbiased sample variance (n − 1); 0 with fewer than two rewards."""
        return self._m2 / (self.rewards - 1) if self.rewards > 1 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def reward_ci(self) -> tuple[float, float]:
        """95% normal interval of the mean reward; zero width with fewer than two rewards."""
        half = Z_95 * math.sqrt(self.reward_variance / self.rewards) if self.rewards > 1 else 0.0
        return self._mean - half, self._mean + half

    def quantile_ms(self, q: float) -> float:
        return self.quantiles_ms((q,))[0]

    def quantiles_ms(self, qs: tuple[float, ...]) -> list[float]:
        """Several quantiles (0–1) in one pass over the buckets; 0 when nothing was recorded."""
        total = sum(self._counts)
        if not total:
            return [0.0] * len(qs)
        ranks = [min(max(q, 0.0), 1.0) * total for q in qs]
        order = sorted(range(len(qs)), key=lambda k: ranks[k])
        out = [0.0] * len(qs)
        cum = 0
        k = 0
        for i, c in enumerate(self._counts):
            while c and k < len(order) and cum + c >= ranks[order[k]]:
                lo, hi = _bucket_bounds(i)
                lo, hi = max(lo, self._min_s), min(hi, self._max_s)
                frac = max(ranks[order[k]] - cum, 0.0) / c
                out[order[k]] = 1000.0 * (lo + (hi - lo) * frac if hi > lo else lo)
                k += 1
            cum += c
        return out


@dataclass(slots=True)
class _Sequential:
    """One candidate's test state: τ² fixed at the first look, the running-minimum p-value."""

    tau2: float
    p: float = 1.0
    looks: int = 0


def msprt_lambda(diff: float, v: float, tau2: float) -> float:
    """The normal-mixture likelihood ratio of "difference ``diff`` with variance ``v``" against
    "no difference" (inf when the data leave no doubt: v = 0 and diff ≠ 0)."""
    if v <= 0.0:
        return math.inf if diff else 1.0
    exponent = tau2 * diff * diff / (2.0 * v * (v + tau2))
    log_l = 0.5 * math.log(v / (v + tau2)) + exponent
    return math.exp(log_l) if log_l < 700.0 else math.inf


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


class Experiment:
    """One experiment (one ``Split.experiment`` id): its variants' stats and, per candidate, the
    sequential test's state.  :meth:`evaluate` advances that state (a look), so call it as often
    as wanted: the p-values stay always valid."""

    def __init__(self, model: str, experiment: str) -> None:
        self.model = model
        self.experiment = experiment
        self._variants: dict[str, VariantStats] = {}
        self._tests: dict[str, _Sequential] = {}

    def has(self, version: str) -> bool:
        """Whether a variant has been seen serving (an exposure) in this experiment."""
        return version in self._variants

    def variant(self, version: str) -> VariantStats:
        found = self._variants.get(version)
        if found is None:
            found = self._variants[version] = VariantStats()
        return found

    def p_value(self, candidate: str) -> float:
        """The candidate's always-valid p-value as of the last look (1 before any)."""
        test = self._tests.get(candidate)
        return test.p if test else 1.0

    def _look(self, control: VariantStats, candidate: str, stats: VariantStats, g: Guardrails) -> float:
        if control.rewards < max(g.min_samples, 2) or stats.rewards < max(g.min_samples, 2):
            return self.p_value(candidate)
        test = self._tests.get(candidate)
        if test is None:
            if g.min_reward_lift > 0:
                tau2 = g.min_reward_lift**2
            else:
                dof = control.rewards + stats.rewards - 2
                pooled = (
                    control.reward_variance * (control.rewards - 1) + stats.reward_variance * (stats.rewards - 1)
                ) / dof
                tau2 = (TAU_STANDARDISED**2) * pooled
            test = self._tests[candidate] = _Sequential(tau2=tau2)
        if test.tau2 <= 0.0:  # every reward so far identical in both arms: nothing to mix over yet
            del self._tests[candidate]
            return 1.0
        v = control.reward_variance / control.rewards + stats.reward_variance / stats.rewards
        lam = msprt_lambda(stats.reward_mean - control.reward_mean, v, test.tau2)
        test.p = min(test.p, 1.0 / lam if lam > 1.0 else 1.0)
        test.looks += 1
        return test.p

    def evaluate(self, split: Split, now: float) -> ExperimentReport:
        """The report and verdict for ``split`` as of now (one look of the sequential test).

        Precedence: a decided split passes its state through; then guardrails (a candidate over
        its error rate or p99 → rollback); then the reward test (significantly better by at
        least ``min_reward_lift`` → promote the best such; significantly worse → rollback);
        otherwise waiting, with what it waits for.  Variants seen in the statistics but absent
        from the split are reported (weight 0) but never decide anything."""
        if split.experiment != self.experiment or split.model != self.model:
            raise ValueError(
                f"split {split.model}/{split.experiment} evaluated by experiment {self.model}/{self.experiment}"
            )
        g = split.guardrails or Guardrails()
        control_name = split.control_version
        control = self.variant(control_name) if control_name else VariantStats()
        weights = {v.version: v.weight for v in split.variants}
        names = [v.version for v in split.variants] + [n for n in self._variants if n not in weights]
        candidates = [v.version for v in split.variants if v.version != control_name]

        p_values = {n: self._look(control, n, self.variant(n), g) for n in names if n != control_name}
        broken: dict[str, list[str]] = {}
        breaches: list[str] = []
        for n in candidates:
            s = self.variant(n)
            if s.requests < g.min_requests:
                continue
            if g.max_error_rate is not None and s.error_rate > g.max_error_rate:
                broken.setdefault(n, []).append("max_error_rate")
                breaches.append(
                    f"candidate {n}: error rate {s.error_rate:.3f} over the guardrail {g.max_error_rate:g}"
                    f" after {s.requests} requests"
                )
            if g.max_p99_ms is not None and (p99 := s.quantile_ms(0.99)) > g.max_p99_ms:
                broken.setdefault(n, []).append("max_p99_ms")
                breaches.append(
                    f"candidate {n}: p99 {p99:.0f} ms over the guardrail {g.max_p99_ms:g} ms"
                    f" after {s.requests} requests"
                )

        reports = []
        for n in names:
            s = self.variant(n)
            p50, p95, p99 = s.quantiles_ms((0.5, 0.95, 0.99))
            low, high = s.reward_ci()
            has_lift = n != control_name and s.rewards > 0 and control.rewards > 0
            reports.append(
                VariantReport(
                    version=n,
                    weight=weights.get(n, 0.0),
                    requests=s.requests,
                    errors=s.errors,
                    error_rate=s.error_rate,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                    rewards=s.rewards,
                    reward_mean=s.reward_mean,
                    reward_ci_low=low,
                    reward_ci_high=high,
                    lift=s.reward_mean - control.reward_mean if has_lift else 0.0,
                    p_value=p_values.get(n, 1.0),
                    guardrail=",".join(broken.get(n, [])),
                )
            )

        verdict, reason, winner = self._verdict(split, g, control_name, candidates, p_values, breaches)
        return ExperimentReport(
            model=self.model,
            experiment=self.experiment,
            state=split.state,
            control=control_name,
            variants=reports,
            verdict=verdict,
            reason=reason,
            winner=winner,
            min_samples=g.min_samples,
            alpha=g.alpha,
            updated_at=now,
        )

    def _verdict(
        self,
        split: Split,
        g: Guardrails,
        control_name: str,
        candidates: list[str],
        p_values: dict[str, float],
        breaches: list[str],
    ) -> tuple[Verdict, str, str]:
        if split.state in ("promoted", "rolled_back"):
            top = max(split.variants, key=lambda v: v.weight).version if split.variants else ""
            when = f" at {split.decided_at}" if split.decided_at else ""
            return (
                split.state,
                f"experiment already {split.state.replace('_', ' ')}{when}: {top} takes the traffic",
                top,
            )
        if split.guardrails is None:
            return "waiting", "no guardrails: report only", ""
        if breaches:
            return "rollback", "; ".join(breaches), control_name
        if not candidates:
            return "waiting", "no candidate: the split has only the control", ""

        return self._compared(g, control_name, candidates, p_values)

    def _compared(
        self, g: Guardrails, control_name: str, candidates: list[str], p_values: dict[str, float]
    ) -> tuple[Verdict, str, str]:
        """The verdict of an experiment under guardrails with no breach: the candidates' rewards
        against the control's."""
        control = self.variant(control_name)
        short = [n for n in [control_name, *candidates] if self.variant(n).rewards < g.min_samples]
        better: list[tuple[float, str]] = []
        worse: list[tuple[float, str]] = []
        small: list[str] = []
        for n in candidates:
            if n in short or control_name in short or p_values[n] > g.alpha:
                continue
            lift = self.variant(n).reward_mean - control.reward_mean
            if lift > 0 and lift >= g.min_reward_lift:
                better.append((lift, n))
            elif lift < 0:
                worse.append((lift, n))
            else:
                small.append(n)

        def evidence(n: str) -> str:
            s = self.variant(n)
            return (
                f"reward {_fmt(s.reward_mean)} vs control {control_name}'s {_fmt(control.reward_mean)}"
                f" (lift {s.reward_mean - control.reward_mean:+.3g}, always-valid p {p_values[n]:.3g} ≤ alpha"
                f" {g.alpha:g}, after {control.rewards} / {s.rewards} rewards)"
            )

        if better:
            _, best = max(better)
            return "promote", f"candidate {best}: {evidence(best)}", best
        if worse:
            _, worst = min(worse)
            return "rollback", f"candidate {worst}: worse than the control: {evidence(worst)}", control_name
        if short:
            counts = ", ".join(f"{n} has {self.variant(n).rewards}" for n in short)
            return "waiting", f"waiting for {g.min_samples} rewards per variant (min_samples): {counts}", ""
        parts = [self._undecided(g, control, n, n in small, p_values[n]) for n in candidates]
        return "waiting", "no significant difference yet: " + "; ".join(parts), ""

    def _undecided(self, g: Guardrails, control: VariantStats, n: str, too_small: bool, p_value: float) -> str:
        """Why candidate ``n`` decides nothing yet: a lift under min_reward_lift, or no significance."""
        s = self.variant(n)
        lift = s.reward_mean - control.reward_mean
        if too_small:
            return (
                f"candidate {n}: lift {lift:+.3g} is significant (p {p_value:.3g} ≤ alpha {g.alpha:g})"
                f" but under min_reward_lift {g.min_reward_lift:g}"
            )
        return (
            f"candidate {n}: lift {lift:+.3g}, always-valid p {p_value:.3g} > alpha {g.alpha:g}"
            f" after {control.rewards} / {s.rewards} rewards"
        )
