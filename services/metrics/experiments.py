"""Experiments' statistics from the events stream (pure: no NATS, no asyncio).

Exposures say which variant served which request id under which experiment; feedback names a
request id and a reward.  :class:`ExperimentBook` joins the two:

- an exposure counts a request (latency, status) for its variant, and remembers the request id
  (the most recent ``max_exposures`` ids: feedback for an older request is unmatched);
- feedback for a remembered id is that variant's reward; feedback that names its variant and
  arrives without a remembered exposure counts for the model's current experiment, if that
  variant has served in it (the name is the client's: an unknown one must never become a
  variant, nor a Prometheus label); feedback that arrives before its exposure (exposures are
  batched) waits for it, within a bound;
- each count is made once per request id (a redelivered exposure batch or a duplicated feedback
  counts once), so replaying the stream after a restart gives the same figures.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.metrics.stats import Experiment
from shared.schemas import ExperimentReport, ExposureBatch, Feedback, Split


@dataclass(frozen=True, slots=True)
class _Seen:
    experiment: str
    variant: str
    rewarded: bool = False


class ExperimentBook:
    def __init__(self, max_exposures: int = 200_000, max_waiting: int = 10_000) -> None:
        self.max_exposures = max_exposures
        self.max_waiting = max_waiting
        self._experiments: dict[tuple[str, str], Experiment] = {}
        self._current: dict[str, str] = {}  # model → the experiment id last seen
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()  # (model, request id)
        self._waiting: OrderedDict[tuple[str, str], Feedback] = OrderedDict()
        self.unmatched = 0  # feedback that never found its request
        self.duplicates = 0

    def experiment(self, model: str, experiment: str) -> Experiment:
        key = (model, experiment)
        found = self._experiments.get(key)
        if found is None:
            found = self._experiments[key] = Experiment(model, experiment)
        return found

    def on_exposures(self, batch: ExposureBatch) -> None:
        for e in batch.exposures:
            key = (e.model, e.id)
            if key in self._seen:
                self.duplicates += 1
                continue
            experiment = self.experiment(e.model, e.experiment)
            new_variant = not experiment.has(e.variant)
            experiment.variant(e.variant).record_request(e.latency_s, e.code)
            self._remember(key, _Seen(e.experiment, e.variant))
            new_experiment = self._current.get(e.model) != e.experiment
            self._current[e.model] = e.experiment
            waiting = self._waiting.pop(key, None)
            if waiting is not None:
                self.on_feedback(waiting)
            if new_experiment or new_variant:
                self._retry_named(e.model)

    def on_feedback(self, fb: Feedback) -> bool:
        """Count a reward; False when it is waiting for (or will never find) its request."""
        key = (fb.model, fb.id)
        seen = self._seen.get(key)
        if seen is not None:
            if seen.rewarded:
                self.duplicates += 1
                return True
            self.experiment(fb.model, seen.experiment).variant(seen.variant).record_reward(fb.reward)
            self._seen[key] = _Seen(seen.experiment, seen.variant, rewarded=True)
            return True
        if fb.variant and fb.model in self._current and self._named_known(fb):
            self.experiment(fb.model, self._current[fb.model]).variant(fb.variant).record_reward(fb.reward)
            self._remember(key, _Seen(self._current[fb.model], fb.variant, rewarded=True))
            return True
        if key in self._waiting:  # an earlier outcome already waits for this request: it counts
            self.duplicates += 1
            return False
        if len(self._waiting) >= self.max_waiting:
            self._waiting.popitem(last=False)
            self.unmatched += 1
        self._waiting[key] = fb
        return False

    def _named_known(self, fb: Feedback) -> bool:
        return self.experiment(fb.model, self._current[fb.model]).has(fb.variant)

    def _retry_named(self, model: str) -> None:
        """Feedback that names its variant waited only for the model's experiment, or that variant
        in it, to be known."""
        for key in [k for k, fb in self._waiting.items() if k[0] == model and fb.variant]:
            self.on_feedback(self._waiting.pop(key))

    def evaluate(self, split: Split, now: float) -> ExperimentReport:
        return self.experiment(split.model, split.experiment).evaluate(split, now)

    def _remember(self, key: tuple[str, str], seen: _Seen) -> None:
        self._seen[key] = seen
        if len(self._seen) > self.max_exposures:
            self._seen.popitem(last=False)
