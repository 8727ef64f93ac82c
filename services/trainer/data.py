"""Which records a rank trains on, and how many steps an epoch has (pure: numpy only).

- Held-out records (for evaluation) are those whose position in their shard satisfies
  ``position % round(1/eval_fraction) == last``: deterministic, spread over every shard, the same
  for any world size.
- Data parallel: rank r reads shards r, r + world, …; every rank runs the same number of steps
  (the smallest rank's record count decides), or DDP would hang waiting for a rank that ran out.
- Pipeline parallel: every stage sees the same batches (the first stage needs the inputs, the last
  the targets), so all ranks read all shards.
- Each rank shuffles its records per epoch with its own seed (``shuffle_seed``); a data-parallel
  step's global batch is the concatenation of the ranks' batches, in rank order.
- Resuming with a different world size keeps the checkpoint's position as a fraction of the epoch
  (``resume_step``): the steps per epoch change with the world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from shared.datasets import DatasetReader, shards_for_rank
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


def shuffle_seed(seed: int, rank: int, parallel: str) -> int:
    """The seed of a rank's epoch order: distinct per rank for dp (each rank has its own records),
    the same on every stage for pp (every stage must see the same batch)."""
    return seed if parallel == "pp" else seed * 1_000_003 + rank


def rank_batches(
    train: dict[str, np.ndarray], per_rank: int, seed: int, epoch: int, offset: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """A rank's batches of one epoch (full batches only), from record ``offset`` of its order."""
    return iter(
        DatasetReader.epoch_batches(train, batch_size=per_rank, seed=seed, epoch=epoch, offset=offset, drop_last=True)
    )


def resume_step(step: int, steps_per_epoch: int, steps: int) -> int:
    """Where in the epoch a checkpoint taken at ``step`` of ``steps_per_epoch`` resumes when the
    epoch now has ``steps`` steps (another world size): the same fraction of the epoch."""
    return min(steps, round(step * steps / max(steps_per_epoch, 1)))
