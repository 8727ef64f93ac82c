"""shared.kv against a real nats-server: a watch survives entries its callback cannot take."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from shared.kv import entries, follow, open_bucket
from shared.names import Names
from tests.helpers import eventually, holds


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


async def test_a_watch_whose_consumer_vanished_follows_again(nc: NatsClient, names: Names) -> None:
    """A cluster can lose a watch's consumer (its server cut off, then healed: seen in
    tests/test_multihost.py) and nats-py's watcher then waits forever without an error.
    ``follow`` checks its consumer when the watch is quiet and, once it is gone, watches again
    (current values first, then updates): the change made while it was blind is applied."""
    bucket = f"{names.prefix}-kvgone"
    kv = await open_bucket(nc.jetstream(), bucket, create=True)
    assert kv is not None
    js = nc.jetstream()
    seen: list[tuple[str, bytes]] = []

    def apply(entry: KeyValue.Entry) -> None:
        seen.append((entry.key, entry.value or b""))

    task = asyncio.create_task(follow(kv, "job.>", apply, check_s=0.5))
    try:
        await kv.put("job.a", b"forming")
        await eventually(lambda: holds(("job.a", b"forming") in seen), 10, "the first value")
        stream = f"KV_{bucket}"
        for name in [c.name for c in await js.consumers_info(stream)]:  # the watch's one consumer
            await js.delete_consumer(stream, name)
        await kv.put("job.a", b"starting")
        # nats-py's own check re-creates the consumer after two missed heartbeats (10-20 s), when
        # JetStream answers then; the watch's own check finds the change missed within 2 check_s.
        await eventually(lambda: holds(("job.a", b"starting") in seen), 5, "the value put while the watch was blind")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await js.delete_key_value(bucket)
