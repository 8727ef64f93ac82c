"""One line when a retried operation starts failing, one when it works again, DEBUG between."""

from __future__ import annotations

import logging

import pytest
from nats.errors import TimeoutError as NatsTimeout

from shared.outage import Outage

log = logging.getLogger("tests.outage")


def test_an_outage_is_two_lines_whatever_its_length(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(log, "heartbeat", "retrying every beat")
    caplog.set_level(logging.DEBUG, logger=log.name)
    outage.succeeded()  # nothing to report while it works
    for _ in range(30):
        outage.failed(NatsTimeout())
    assert outage.ongoing and outage.failures == 30
    outage.succeeded()
    assert not outage.ongoing
    lines = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert [level for level, _, _ in lines] == [logging.WARNING] + [logging.DEBUG] * 29 + [logging.INFO]
    assert lines[0][1].startswith("heartbeat failed (") and lines[0][1].endswith("retrying every beat")
    assert not lines[0][2], "JetStream's passing state needs no traceback"
    assert lines[-1][1] == "heartbeat works again after 30 failures"


def test_a_failure_that_is_not_the_bus_state_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(log, "jobs: fetch", "retrying every 1s")
    with caplog.at_level(logging.WARNING, logger=log.name):
        outage.failed(ValueError("a bug"))
        outage.failed(ValueError("a bug"))
    [record] = caplog.records
    assert record.exc_info is not None and "ValueError: a bug" in record.getMessage()
