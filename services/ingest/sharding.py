"""Assigning records to shards and cutting shards into batches (pure: numpy only).

- Round-robin: the record with global index ``g`` goes to shard ``g % n``, so shard sizes differ
  by at most one (data-parallel ranks need equal batch counts).
- By key: shard ``h(key) % n`` with a stable hash (CRC-32 of the value's text), so a key's
  records always land together.

Each shard is cut into batches of exactly ``batch_rows`` records (the last may be short), so
batch ``k`` of shard ``s`` holds the same records whatever the parser's block sizes were: a
re-run produces byte-identical batches, which is what makes resuming and checksums work.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

Columns = dict[str, np.ndarray]


@dataclass
class ShardBatch:
    shard: int
    batch: int
    offset: int  # index of the batch's first record within the shard
    columns: Columns

    @property
    def count(self) -> int:
        return len(next(iter(self.columns.values())))


@dataclass
class _Pending:
    parts: list[Columns] = field(default_factory=list)
    rows: int = 0
    batches: int = 0
    records: int = 0  # records of this shard already emitted in batches


class Sharder:
    def __init__(self, shards: int, batch_rows: int, key: str | None = None) -> None:
        if shards < 1 or batch_rows < 1:
            raise ValueError("shards and batch_rows must be at least 1")
        self.shards = shards
        self.batch_rows = batch_rows
        self.key = key
        self.seen = 0  # global record index of the next record
        self._pending = [_Pending() for _ in range(shards)]

    def add(self, columns: Columns) -> Iterator[ShardBatch]:
        """Route a block of records; yields every batch that became full."""
        n = len(next(iter(columns.values()))) if columns else 0
        if n == 0:
            return
        if self.key is None:
            for shard in range(self.shards):
                start = (shard - self.seen) % self.shards
                if start < n:
                    yield from self._append(shard, {k: v[start :: self.shards] for k, v in columns.items()})
        else:
            targets = shard_of_keys(columns[self.key], self.shards)
            for shard in range(self.shards):
                mask = targets == shard
                if mask.any():
                    yield from self._append(shard, {k: v[mask] for k, v in columns.items()})
        self.seen += n

    def flush(self) -> Iterator[ShardBatch]:
        """The last, short batch of every shard."""
        for shard, pending in enumerate(self._pending):
            if pending.rows:
                yield self._emit(shard, pending, pending.rows)

    def _append(self, shard: int, part: Columns) -> Iterator[ShardBatch]:
        pending = self._pending[shard]
        pending.parts.append(part)
        pending.rows += len(next(iter(part.values())))
        while pending.rows >= self.batch_rows:
            yield self._emit(shard, pending, self.batch_rows)

    def _emit(self, shard: int, pending: _Pending, rows: int) -> ShardBatch:
        merged = {k: np.concatenate([p[k] for p in pending.parts]) for k in pending.parts[0]}
        batch = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        pending.parts = [rest] if len(next(iter(rest.values()))) else []
        pending.rows -= rows
        out = ShardBatch(shard=shard, batch=pending.batches, offset=pending.records, columns=batch)
        pending.batches += 1
        pending.records += rows
        return out


def shard_of_keys(keys: np.ndarray, shards: int) -> np.ndarray:
    """Stable shard numbers for key values (same value → same shard, across runs and hosts)."""
    if keys.dtype.kind in "iu":
        # splitmix64 finaliser: well-mixed and vectorised for integer keys
        z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return (z % np.uint64(shards)).astype(np.int64)
    return np.array([zlib.crc32(str(k).encode()) % shards for k in keys.tolist()], dtype=np.int64)


def batch_rows_for(bytes_per_record: int, batch_bytes: int) -> int:
    """Records per batch so that a batch message stays near ``batch_bytes``."""
    return max(1, batch_bytes // max(bytes_per_record, 1))
