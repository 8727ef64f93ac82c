"""shared.kv against a real nats-server: a watch survives entries its callback cannot take."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from shared.kv import entries, follow, open_bucket
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


async def test_entries_lists_every_live_key_right_after_it_is_written(nc: NatsClient, names: Names) -> None:
    js = nc.jetstream()
    bucket = f"{names.prefix}-entries"
    kv = await open_bucket(js, bucket, create=True)
    assert kv is not None
    try:
        assert await entries(kv) == []
        # nats-py's keys() could read a full bucket as empty just after a write: list at once,
        # many times over, and every key written so far must be there.
        for i in range(30):
            await kv.put(f"manifest.d.{i}", str(i).encode())
            listed = await entries(kv, "manifest.")
            assert [e.key for e in listed] == sorted(f"manifest.d.{n}" for n in range(i + 1))
        await kv.put("other.x", b"1")
        await kv.delete("manifest.d.3")
        await kv.purge("manifest.d.4")
        keys = [e.key for e in await entries(kv, "manifest.")]
        assert "manifest.d.3" not in keys and "manifest.d.4" not in keys and len(keys) == 28
        assert "other.x" in [e.key for e in await entries(kv)]
    finally:
        await js.delete_key_value(bucket)
