"""Which records a rank trains on, and how many steps an epoch has (pure: numpy only).

- Held-out records (for evaluation) are those whose position in their shard satisfies
  ``position % round(1/eval_fraction) == last``: deterministic, spread over every shard, the same
  for any world size.
- Data parallel: rank r reads shards r, r + world, …; every rank runs the same number of steps
  (the smallest rank's record count decides), or DDP would hang waiting for a rank that ran out.
- Pipeline parallel: every stage sees the same batches (the first stage needs the inputs, the last
  the targets), so all ranks read all shards.
"""

from __future__ import annotations

import numpy as np

from shared.datasets import shards_for_rank
from shared.schemas import DatasetManifest


def held_out_mask(count: int, eval_fraction: float) -> np.ndarray:
    if eval_fraction <= 0:
        return np.zeros(count, dtype=bool)
    every = max(2, round(1 / eval_fraction))
    return np.arange(count) % every == every - 1


def train_shards(manifest: DatasetManifest, rank: int, world: int, parallel: str) -> list[int]:
    shards = len(manifest.shards)
    return shards_for_rank(shards, rank, world) if parallel == "dp" else list(range(shards))


def train_records(manifest: DatasetManifest, shards: list[int], eval_fraction: float) -> int:
    return sum(int((~held_out_mask(manifest.shards[s].records, eval_fraction)).sum()) for s in shards)


def steps_per_epoch(manifest: DatasetManifest, world: int, parallel: str, batch_size: int, eval_fraction: float) -> int:
    """Steps every rank runs per epoch (global batch ``batch_size``)."""
    if parallel == "pp":
        return train_records(manifest, list(range(len(manifest.shards))), eval_fraction) // batch_size
    per_rank_batch = batch_size // world
    fewest = min(train_records(manifest, train_shards(manifest, r, world, "dp"), eval_fraction) for r in range(world))
    return fewest // per_rank_batch


def split(
    arrays: dict[str, np.ndarray], shard_sizes: list[int], eval_fraction: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, held-out) from the concatenated records of consecutive shards."""
    mask = np.concatenate([held_out_mask(n, eval_fraction) for n in shard_sizes]) if shard_sizes else np.zeros(0, bool)
    return {k: v[~mask] for k, v in arrays.items()}, {k: v[mask] for k, v in arrays.items()}
