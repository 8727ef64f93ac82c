"""Choosing a variant for a request (pure: no NATS, no HTTP).

- Weighted: a variant's share of requests is its weight over the sum of weights.
- Sticky: with a key (e.g. a user id from a header), the variant is a function of the key's hash,
  so the same key always gets the same variant while the split is unchanged; over many keys the
  shares follow the weights.
- Mirrors: each mirror gets a copy of ``percent``% of requests; its replies are discarded.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from itertools import accumulate

from shared.errors import BadRequest
from shared.schemas import Split, Variant

_UNIT = float(1 << 64)


def key_fraction(key: str, salt: str) -> float:
    """A stable number in [0, 1) for ``key`` (salted by the model, so splits of different models
    are independent)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _UNIT


def choose(split: Split, key: str | None, rng: random.Random | None = None) -> str:
    """The version that serves this request."""
    weights = [max(v.weight, 0.0) for v in split.variants]
    total = sum(weights)
    if total <= 0:
        raise BadRequest(f"the split of {split.model} has no variant with a positive weight")
    point = (key_fraction(key, split.model) if key is not None else (rng or random).random()) * total
    index = bisect_right(list(accumulate(weights)), point)
    return split.variants[min(index, len(weights) - 1)].version


def mirrors_for(split: Split, rng: random.Random | None = None) -> list[str]:
    """The mirror versions that get a copy of this request."""
    draw = (rng or random).random
    return [m.version for m in split.mirrors if draw() * 100 < m.percent]


def parse_variants(items: list[str]) -> list[Variant]:
    """``["1=90", "2=10"]`` → variants; a 400 for anything else."""
    out = []
    for item in items:
        version, sep, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not version or value < 0:
            raise BadRequest(f"{item!r} is not VERSION=WEIGHT")
        out.append(Variant(version=version.lstrip("v"), weight=value))
    return out
