"""The experiment statistics' error rates and power, by simulation (no mesh, no NATS).

    .venv/bin/python bench/experiments.py [--runs 1000] [--max-per-arm 10000] [--every 50]

Conversions (Bernoulli rewards): the control converts at ``--base`` (0.10), the candidate at
base + lift.  Each run feeds both arms ``--every`` rewards at a time and looks after each batch
with the real ``Experiment.evaluate`` (default guardrails: alpha 0.05, min_samples 200, τ² from
the pooled σ) until it decides or reaches ``--max-per-arm``.  Per true lift:

- promote / rollback / undecided: the share of runs that ended so (at lift 0, promote is the
  false promotion rate and promote + rollback the false decision rate);
- median n: rewards per arm when the decision came (runs that decided);
- z every look: a fixed-horizon two-sided z-test (|z| > 1.96) applied at every look from
  min_samples on, stopping at the first "significant" one: what peeking does to a classical test;
- z once at N: the same z-test looked at once, at ``--max-per-arm`` (its valid use): the power a
  fixed horizon buys with no early stopping.

Seeds are fixed; the figures are the same on every machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.metrics.stats import Experiment  # noqa: E402
from shared.schemas import Guardrails, Split, Variant  # noqa: E402

Z = 1.959963984540054


def _summaries(successes: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (run, look) batch of 0/1 rewards: mean and M2 (exactly every · mean · (1 − mean))."""
    mean = successes / every
    return mean, every * mean * (1.0 - mean)


def _naive(sa: np.ndarray, sb: np.ndarray, every: int, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The z-test's sign at the first look where |z| > 1.96 (0 if none), and at the last look."""
    n = np.arange(1, sa.shape[1] + 1) * every
    pa = sa.cumsum(axis=1) / n
    pb = sb.cumsum(axis=1) / n
    var = (pa * (1 - pa) + pb * (1 - pb)) / (n - 1)  # unbiased sample variances over n
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (pb - pa) / np.sqrt(var), 0.0)
    z[:, n < min_samples] = 0.0
    hit = np.abs(z) > Z
    first = np.where(hit.any(axis=1), np.sign(z[np.arange(len(z)), hit.argmax(axis=1)]), 0.0)
    last = np.where(hit[:, -1], np.sign(z[:, -1]), 0.0)
    return first, last


def scenario(lift: float, base: float, runs: int, looks: int, every: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    g = Guardrails()
    split = Split(
        model="m",
        experiment="e",
        variants=[Variant(version="1", weight=0.5), Variant(version="2", weight=0.5)],
        guardrails=g,
    )
    sa = rng.binomial(every, base, (runs, looks))  # successes per batch of ``every`` rewards
    sb = rng.binomial(every, base + lift, (runs, looks))
    ma, m2a = _summaries(sa, every)
    mb, m2b = _summaries(sb, every)
    outcomes = {"promote": 0, "rollback": 0, "waiting": 0}
    decided_at: list[int] = []
    for r in range(runs):
        exp = Experiment("m", "e")
        control, candidate = exp.variant("1"), exp.variant("2")
        verdict = "waiting"
        for k in range(looks):
            control.merge_rewards(every, float(ma[r, k]), float(m2a[r, k]))
            candidate.merge_rewards(every, float(mb[r, k]), float(m2b[r, k]))
            verdict = exp.evaluate(split, 0.0).verdict
            if verdict != "waiting":
                decided_at.append((k + 1) * every)
                break
        outcomes[verdict] += 1
    first, last = _naive(sa, sb, every, g.min_samples)
    return {
        "promote": outcomes["promote"] / runs,
        "rollback": outcomes["rollback"] / runs,
        "waiting": outcomes["waiting"] / runs,
        "median_n": float(np.median(decided_at)) if decided_at else math.nan,
        "naive_any": float((first != 0).mean()),
        "naive_promote": float((first > 0).mean()),
        "once_any": float((last != 0).mean()),
        "once_promote": float((last > 0).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--max-per-arm", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--base", type=float, default=0.10)
    parser.add_argument("--lifts", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.03, 0.05, -0.02])
    args = parser.parse_args()
    looks = args.max_per_arm // args.every
    print(
        f"Bernoulli rewards, control {args.base:g}; {args.runs} runs per row, a look every {args.every} rewards"
        f" per arm, up to {looks * args.every}; alpha 0.05, min_samples 200"
    )
    head = (
        f"{'lift':>6} {'promote':>8} {'rollback':>9} {'undecided':>10} {'median n':>9}"
        f" {'z every look':>13} {'z once at N':>12}  {'s':>5}"
    )
    print(head)
    print("-" * len(head))
    for i, lift in enumerate(args.lifts):
        t0 = time.perf_counter()
        r = scenario(lift, args.base, args.runs, looks, args.every, seed=1000 + i)
        print(
            f"{lift:>+6.3f} {r['promote']:>8.3f} {r['rollback']:>9.3f} {r['waiting']:>10.3f} {r['median_n']:>9.0f}"
            f" {r['naive_any']:>13.3f} {r['once_any']:>12.3f}  {time.perf_counter() - t0:>5.1f}"
        )
    print(
        "\nlift 0: promote is the false promotion rate, promote + rollback the false decision rate;"
        "\nz columns: share of runs where a two-sided z-test (|z| > 1.96) called a difference."
    )


if __name__ == "__main__":
    main()
