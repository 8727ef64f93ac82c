"""JetStream's passing states (shared/transient.py) against a real nats-server: what counts as
"not now", and start-up waiting it out."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

from shared import transient


async def test_jetstream_answering_no_one_is_not_now_and_a_bad_request_is_not(nc: NatsClient) -> None:
    absent = nc.jetstream(domain="absent", timeout=1)  # a domain no server runs: no responders
    with pytest.raises(Exception) as nobody:
        await absent.account_info()
    assert transient.jetstream_not_now(nobody.value)
    with pytest.raises(NotFoundError) as bad:  # no such stream: an answer, not a passing state
        await nc.jetstream().stream_info("NO_SUCH_STREAM")
    assert not transient.jetstream_not_now(bad.value)


async def test_start_up_waits_out_not_now_and_fails_at_once_otherwise(
    nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def forming() -> Any:
        nonlocal calls
        calls += 1
        js = nc.jetstream(domain="absent", timeout=1) if calls <= 3 else nc.jetstream()
        return await js.account_info()

    info = await transient.retry_not_now("the test's stream", forming, within_s=10, pause_s=0.05)
    assert calls == 4 and info is not None
    assert len([r for r in caplog.records if "cannot serve it yet" in r.getMessage()]) == 1

    async def refused() -> Any:
        nonlocal calls
        calls += 1
        return await nc.jetstream().stream_info("NO_SUCH_STREAM")

    calls = 0
    with pytest.raises(NotFoundError):
        await transient.retry_not_now("a bad stream", refused, within_s=10, pause_s=0.05)
    assert calls == 1

    calls = 0
    with pytest.raises(Exception) as gave_up:  # still not now at the end: its last error
        await transient.retry_not_now(
            "never", lambda: nc.jetstream(domain="absent", timeout=1).account_info(), within_s=0.3, pause_s=0.05
        )
    assert transient.jetstream_not_now(gave_up.value)
