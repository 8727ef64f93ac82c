"""Dataset version numbers: handed out per dataset with compare-and-set (``seq.<dataset>`` in the
datasets bucket, :func:`shared.kv.next_number`), and given back by a job that failed.

A failed job gives its number back only while it is still the last one handed out (the counter
moves back by compare-and-set), so the next ingest of the dataset gets it.  When another job took
a later number in the meantime, the failed one's number stays a gap: numbers are never shared,
and a version is never renumbered after its batches were published.
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.names import dataset_seq_key


async def give_back(kv: KeyValue, dataset: str, version: str) -> bool:
    """Move ``seq.<dataset>`` from ``version`` back by one; False when it no longer is ``version``."""
    key = dataset_seq_key(dataset)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return False
    if (entry.value or b"").decode() != version or not version.isdigit():
        return False
    try:
        await kv.update(key, str(int(version) - 1).encode(), last=entry.revision)
    except KeyWrongLastSequenceError:
        return False
    return True
