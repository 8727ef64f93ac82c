"""Small helpers over JetStream key-value buckets."""

from __future__ import annotations

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
