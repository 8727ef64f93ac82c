"""Small helpers over JetStream key-value buckets."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue


async def open_bucket(js: JetStreamContext, bucket: str, *, create: bool = False, replicas: int = 1) -> KeyValue | None:
    """The bucket, or None when it does not exist (created instead when ``create``)."""
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BucketNotFoundError):
        if not create:
            return None
        return await js.create_key_value(KeyValueConfig(bucket=bucket, storage=StorageType.FILE, replicas=replicas))


async def follow(kv: KeyValue, keys: str, apply: Callable[[KeyValue.Entry], Awaitable[None] | object]) -> None:
    """Apply every change of ``keys`` (current values first, then updates, deletes with an empty
    value) for as long as the caller's task runs.  nats-py's watcher re-creates its consumer
    after a NATS restart, so this keeps following (tested across a restart)."""
    watcher = await kv.watch(keys)
    while True:
        try:
            entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
        except Exception:  # a timeout, or a disconnect the watcher recovers from
            continue
        if entry is not None:
            result = apply(entry)
            if inspect.isawaitable(result):
                await result


async def next_number(kv: KeyValue, key: str) -> int:
    """Hand out 1, 2, 3… under ``key``, safely against concurrent callers (compare-and-set)."""
    while True:
        try:
            entry = await kv.get(key)
            number = int((entry.value or b"0").decode()) + 1
            await kv.update(key, str(number).encode(), last=entry.revision)
            return number
        except KeyNotFoundError:
            try:
                await kv.create(key, b"1")
                return 1
            except KeyWrongLastSequenceError:
                continue
        except KeyWrongLastSequenceError:
            continue
