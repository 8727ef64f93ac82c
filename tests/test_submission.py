"""The checks on a submitted training job, each on its own, with no NATS and no trainer."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.trainer.submission import check_dataset, check_model, check_request
from shared.errors import BadRequest
from shared.schemas import DatasetManifest, ShardInfo, TrainRequest

REQUEST = TrainRequest(
    model="m", factory="zoo.classifier:mlp", kwargs={"inputs": 64, "classes": 10}, dataset="digits", batch_size=64
)


def request(**changes: Any) -> TrainRequest:
    return msgspec.structs.replace(REQUEST, **changes)


def manifest(shards: int) -> DatasetManifest:
    return DatasetManifest(
        dataset="digits",
        version="3",
        format="npz",
        columns=[],
        sharding="round_robin",
        shards=[ShardInfo(index=i, subject=f"s.{i}", records=1, batches=1, bytes=1, sha256="") for i in range(shards)],
        records=shards,
        rejected=0,
        bytes=shards,
        created_at="",
        sources=[],
        fingerprint="",
        job_id="",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "no spaces"}, "model name"),
        ({"parallel": "tp"}, "parallel must be dp or pp \\(got 'tp'\\)"),
        ({"optimizer": "adamw"}, "optimizer must be adam or sgd \\(got 'adamw'\\)"),
        ({"device": "mps"}, "device must be auto, cpu, cuda \\(got 'mps'\\)"),
        ({"nodes": 0}, "nodes must be ≥ 1"),
        ({"parallel": "pp", "nodes": 1}, "≥ 2 for pp"),
        ({"nodes": 2, "min_nodes": 3}, "min_nodes must be between 1 and nodes \\(2\\)"),
        ({"parallel": "pp", "nodes": 2, "min_nodes": 1}, "pp needs all its stages"),
        ({"nodes": 3, "batch_size": 64}, "batch size 64 must divide evenly over 3 nodes"),
        ({"parallel": "pp", "nodes": 2, "batch_size": 6, "microbatches": 4}, "must divide into 4 micro-batches"),
        ({"epochs": 0}, "epochs and batch size must be ≥ 1 and lr > 0"),
        ({"lr": 0.0}, "lr > 0"),
    ],
)
def test_a_bad_request_is_refused_with_what_to_change(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_request(request(**changes))


def test_min_nodes_defaults_to_nodes() -> None:
    assert check_request(request(nodes=2)).min_nodes == 2
    assert check_request(request(nodes=4, min_nodes=2)).min_nodes == 2
    assert check_request(request(parallel="pp", nodes=2, batch_size=8)).min_nodes == 2


def test_too_few_shards_for_min_nodes_are_refused() -> None:
    with pytest.raises(
        BadRequest, match="dataset digits has 1 shards, fewer than the 2 nodes: ingest it with --shards ≥ 4"
    ):
        check_dataset(request(nodes=4, min_nodes=2), manifest(1))


def test_the_dataset_is_pinned_to_the_manifests_version() -> None:
    checked = check_dataset(request(nodes=4, min_nodes=2), manifest(2))
    assert (checked.dataset, checked.min_nodes) == ("digits@3", 2)
    assert check_dataset(request(parallel="pp", nodes=2), manifest(1)).dataset == "digits@3"  # pp: every rank reads all


def test_a_factory_outside_the_trusted_packages_is_refused_before_any_import() -> None:
    with pytest.raises(BadRequest, match="model factory 'os:system' refused"):
        check_model(request(factory="os:system"), [])


def test_kwargs_that_are_not_plain_data_are_refused() -> None:
    with pytest.raises(BadRequest, match="model kwargs"):
        check_model(request(kwargs={"not an identifier": 1}), [])


def test_a_trusted_factory_that_cannot_build_is_refused_and_one_that_can_passes() -> None:
    with pytest.raises(BadRequest, match=r"model factory zoo\.classifier:mlp failed"):
        check_model(request(kwargs={"inputs": -1, "classes": 10}), [])
    check_model(REQUEST, [])
