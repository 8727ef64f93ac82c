"""shared.kv against a real nats-server: a watch survives entries its callback cannot take."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from shared.kv import follow, open_bucket
from shared.names import Names


async def test_one_bad_entry_never_ends_the_watch(
    nc: NatsClient, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    kv = await open_bucket(nc.jetstream(), f"{names.prefix}-kvtest", create=True)
    assert kv is not None
    seen: list[str] = []
    good = asyncio.Event()

    def apply(entry: KeyValue.Entry) -> None:
        if entry.value == b"bad":
            raise ValueError("undecodable record")
        seen.append(entry.key)
        if entry.key == "deploy.after":
            good.set()

    task = asyncio.create_task(follow(kv, "deploy.>", apply))
    try:
        await kv.put("deploy.before", b"ok")
        await kv.put("deploy.broken", b"bad")
        await kv.put("deploy.after", b"ok")
        await asyncio.wait_for(good.wait(), 10)
        assert seen == ["deploy.before", "deploy.after"]
        assert not task.done()
        assert any("deploy.broken" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.jetstream().delete_key_value(f"{names.prefix}-kvtest")
