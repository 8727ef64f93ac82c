"""Traffic splits (pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shared.errors import BadRequest
from shared.schemas import Mirror, Split
from shared.splits import choose, mirrors_for, parse_variants


def test_sticky_keys_keep_their_variant_and_follow_the_weights() -> None:
    split = Split(model="digits", variants=parse_variants(["v1=90", "v2=10"]), sticky="X-User")
    shares = Counter(choose(split, f"user-{i}") for i in range(10_000))
    assert abs(shares["1"] / 10_000 - 0.90) <= 0.02 and abs(shares["2"] / 10_000 - 0.10) <= 0.02
    assert all(choose(split, f"user-{i}") == choose(split, f"user-{i}") for i in range(200))
    # Another model's split assigns keys independently.
    other = Split(model="other", variants=split.variants)
    assert sum(choose(split, f"u{i}") != choose(other, f"u{i}") for i in range(1000)) > 50


def test_unkeyed_requests_are_weighted_at_random() -> None:
    split = Split(model="m", variants=parse_variants(["1=1", "2=1", "3=2"]))
    rng = random.Random(0)
    shares = Counter(choose(split, None, rng) for _ in range(20_000))
    assert abs(shares["3"] / 20_000 - 0.5) < 0.02 and abs(shares["1"] / 20_000 - 0.25) < 0.02


def test_mirrors_get_their_percentage() -> None:
    split = Split(model="m", variants=parse_variants(["1=1"]), mirrors=[Mirror(version="3", percent=20)])
    rng = random.Random(1)
    copies = sum(mirrors_for(split, rng) == ["3"] for _ in range(10_000))
    assert abs(copies / 10_000 - 0.2) < 0.02


def test_bad_splits_are_refused() -> None:
    with pytest.raises(BadRequest, match="is not VERSION=WEIGHT"):
        parse_variants(["1:90"])
    with pytest.raises(BadRequest, match="no variant with a positive weight"):
        choose(Split(model="m", variants=parse_variants(["1=0"])), None)
