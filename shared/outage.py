"""Failures of an operation that is retried on a schedule, logged once per outage.

A heartbeat or a fetch loop meets the same failure every second while NATS is away or a stream
elects its leader: one WARNING when the outage starts (with a traceback only when the failure is
not one of JetStream's passing states), DEBUG while it lasts, one INFO line with the count when it
ends.  ``ongoing`` says whether the last try failed (the trainer's view of its own beats).
"""

from __future__ import annotations

import logging

from shared import transient


class Outage:
    """The failures in a row of one retried operation, ``what`` (``"heartbeat"``, ``"jobs: fetch"``)."""

    def __init__(self, log: logging.Logger, what: str, retry: str) -> None:
        self.log = log
        self.what = what
        self.retry = retry  # how it is retried, for the first line: "retrying every beat"
        self.failures = 0  # in a row; 0 while the operation works

    @property
    def ongoing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures > 1:
            self.log.debug("%s failed again: %s", self.what, exc)
        elif transient.jetstream_not_now(exc):
            self.log.warning("%s failed (%s); %s", self.what, transient.reason(exc), self.retry)
        else:
            self.log.warning("%s failed (%s: %s); %s", self.what, type(exc).__name__, exc, self.retry, exc_info=exc)

    def succeeded(self) -> None:
        if self.failures:
            self.log.info("%s works again after %d failures", self.what, self.failures)
            self.failures = 0
