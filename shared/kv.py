"""Small helpers over JetStream key-value buckets."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


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
