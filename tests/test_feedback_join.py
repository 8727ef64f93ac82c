"""The metrics service's join of exposures and feedback (``services/metrics/experiments.py``),
pure: each request id is rewarded once, by its first feedback, whatever the order in which the
two subjects of the events stream are read (they are read by separate consumers, live and again
on every replay)."""

from __future__ import annotations

import pytest

from services.metrics.experiments import ExperimentBook
from shared.schemas import Exposure, ExposureBatch, Feedback

EXPOSED = ExposureBatch(
    router="r1",
    exposures=[Exposure(id="a", model="digits", variant="2", experiment="e1", latency_s=0.01, ts=1.0)],
)
FIRST = Feedback(id="a", model="digits", reward=1.0)
LATER = Feedback(id="a", model="digits", reward=0.0)  # a second outcome for the same request


@pytest.mark.parametrize(
    "order",
    [
        ("exposure", "first", "later"),
        ("first", "exposure", "later"),
        ("first", "later", "exposure"),  # both outcomes wait for the exposure
    ],
)
def test_a_request_is_rewarded_once_by_its_first_feedback_in_any_arrival_order(order: tuple[str, ...]) -> None:
    book = ExperimentBook()
    for item in order:
        if item == "exposure":
            book.on_exposures(EXPOSED)
        else:
            book.on_feedback(FIRST if item == "first" else LATER)
    stats = book.experiment("digits", "e1").variant("2")
    assert (stats.requests, stats.rewards, stats.reward_mean) == (1, 1, 1.0)
    assert (book.duplicates, book.unmatched) == (1, 0)


def test_feedback_that_never_finds_its_request_is_given_up_past_the_bound() -> None:
    book = ExperimentBook(max_waiting=2)
    for request_id in ("x", "y", "z"):
        assert not book.on_feedback(Feedback(id=request_id, model="digits"))
    assert book.unmatched == 1  # x, the oldest, was given up for z
    book.on_exposures(
        ExposureBatch(
            router="r1",
            exposures=[
                Exposure(id=i, model="digits", variant="1", experiment="e1", latency_s=0.01, ts=1.0) for i in "xyz"
            ],
        )
    )
    stats = book.experiment("digits", "e1").variant("1")
    assert (stats.requests, stats.rewards) == (3, 2)
