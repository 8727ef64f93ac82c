"""When JetStream cannot serve now: one rule for every service.

A stream's leader is being elected (a server left), its replicas lost quorum (a partition), a
server that rejoined is still catching up ("JetStream system temporarily unavailable"), or the
JetStream API did not answer in time.  None of it is the request's fault and none of it lasts:
the caller gets a 503 that says so (``shared.errors.Unavailable``), and the service logs one line
without a traceback, not an error per request.  A full stream is a 503 from JetStream too, but it
is the callers' load, not the bus's state: the durable path answers it with a 429.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

STREAM_FULL = 10077  # JetStream: the stream's limits refuse the message (discard policy new)
RETRY_AFTER_S = 2.0  # an election takes a few seconds; sooner mostly meets the same answer
STARTUP_WAIT_S = 60.0  # how long start-up waits for a forming cluster's JetStream

T = TypeVar("T")
log = logging.getLogger(__name__)


def jetstream_not_now(exc: BaseException) -> bool:
    """Whether ``exc`` says JetStream cannot serve now, as opposed to a bug or a bad request."""
    if isinstance(exc, ServiceUnavailableError):  # nats-py's answer to no responders, or JetStream's 503
        return exc.err_code != STREAM_FULL
    if isinstance(exc, APIError):
        return (exc.code or 0) >= 500 and exc.err_code != STREAM_FULL
    # No responders on a JetStream API subject: no server of this account runs JetStream now.
    return isinstance(exc, NoStreamResponseError | NatsTimeout | NoRespondersError)


def reason(exc: BaseException) -> str:
    """What JetStream said, for the caller and the log."""
    if isinstance(exc, APIError):
        return exc.description or "no JetStream server answered"
    return str(exc) or type(exc).__name__


async def retry_not_now(
    what: str, call: Callable[[], Awaitable[T]], *, within_s: float = STARTUP_WAIT_S, pause_s: float = RETRY_AFTER_S
) -> T:
    """``call()``, made again every ``pause_s`` while JetStream answers "not now", for up
    to ``within_s``; then its last error.  For start-up: the servers of a cluster that start
    together have no JetStream leader for their first seconds, and a service that creates its
    streams then would otherwise exit and be restarted by its supervisor."""
    deadline = time.monotonic() + within_s
    waited = False
    while True:
        try:
            return await call()
        except Exception as exc:
            if not jetstream_not_now(exc) or time.monotonic() + pause_s > deadline:
                raise
            if not waited:
                log.warning("%s: JetStream cannot serve it yet (%s); retrying for %gs", what, reason(exc), within_s)
                waited = True
        await asyncio.sleep(pause_s)
