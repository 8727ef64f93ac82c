"""Pure logic of Open Inference Protocol conformance: which versions a request may name
(shared.routing), how outputs are encoded (services.router.oip), and the strict input check of a
loaded model (services.inference.model).  See docs/serving.md, "HTTP gateway"."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import numpy as np
import pytest

from services.inference.model import LoadedModel, oip_datatype
from services.router.oip import class_labels, encode_response, json_values, tensor_metadata
from shared.errors import BadRequest, NotFound
from shared.routing import RoutingTable
from shared.schemas import ColumnSpec, Deployment, Mirror, ModelVersion, Split, Variant
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp


def table(*deployments: Deployment, split: Split | None = None) -> RoutingTable:
    t = RoutingTable()
    for d in deployments:
        t.apply(f"deploy.{d.model}.{d.ref}", msgspec.json.encode(d))
    if split is not None:
        t.apply(f"split.{split.model}", msgspec.json.encode(split))
    return t


# -- which versions are served -------------------------------------------------------------------


def test_served_versions_are_the_deployed_the_replaced_and_the_split_ones_in_version_order() -> None:
    t = table(
        Deployment(model="m", ref="latest", version="10", previous="2"),
        Deployment(model="m", ref="3", version="3"),
        Deployment(model="other", ref="latest", version="7"),
        split=Split(
            model="m",
            variants=[Variant(version="3", weight=1), Variant(version="12", weight=1)],
            mirrors=[Mirror(version="9", percent=5)],
        ),
    )
    assert t.versions("m") == ["2", "3", "9", "10", "12"]
    assert t.versions("other") == ["7"] and t.versions("nope") == []
    for version in ("2", "3", "9", "10", "12"):
        t.check_served("m", version)
        assert t.route("m", version).version == version


def test_a_version_nobody_serves_is_a_404_naming_it_not_a_retryable_503() -> None:
    t = table(Deployment(model="m", ref="latest", version="1"), Deployment(model="m", ref="2", version="2"))
    with pytest.raises(NotFound, match=r"version '99' of model 'm' is not deployed \(deployed: 1, 2; "):
        t.route("m", "99")
    with pytest.raises(NotFound, match="model 'nope' is not deployed"):
        t.route("nope", "1")
    with pytest.raises(NotFound, match="model 'nope' is not deployed"):
        t.route("nope")


def test_a_split_alone_makes_its_versions_servable() -> None:
    split = Split(model="s", variants=[Variant(version="4", weight=1)], control="4")
    t = table(split=split)
    assert t.versions("s") == ["4"]
    assert t.route("s", "4").version == "4"
    with pytest.raises(NotFound, match=r"version '5' of model 's' is not deployed \(deployed: 4;"):
        t.check_served("s", "5")
    t.apply("split.s", None)  # the split deleted: nothing is served any more
    with pytest.raises(NotFound, match="model 's' is not deployed"):
        t.check_served("s", "4")


# -- outputs -------------------------------------------------------------------------------------


def decode(body: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(body)
    return out


def test_finite_outputs_are_plain_json_numbers() -> None:
    logits = np.array([[0.5, -1.25]], dtype=np.float32)
    body, length = encode_response(
        model="m", version="1", request_id="r", outputs={"logits": logits, "class": np.array([0])}, binary=False
    )
    assert length is None
    out = decode(body)["outputs"]
    assert out == [
        {"name": "logits", "shape": [1, 2], "datatype": "FP32", "data": [0.5, -1.25]},
        {"name": "class", "shape": [1], "datatype": "INT64", "data": [0]},
    ]


def test_non_finite_outputs_are_spelled_as_strings_in_json_never_null() -> None:
    logits = np.array([[np.nan, np.inf], [-np.inf, 2.0]], dtype=np.float32)
    body, _ = encode_response(model="m", version="1", request_id="r", outputs={"logits": logits}, binary=False)
    assert b"null" not in body
    (out,) = decode(body)["outputs"]
    assert out["data"] == ["NaN", "Infinity", "-Infinity", 2.0] and out["datatype"] == "FP32"
    assert json_values(np.array([np.nan], dtype=np.float16)) == ["NaN"]
    assert json_values(np.array([3, 4])) == [3, 4]  # integers: never checked


def test_non_finite_outputs_are_ieee_values_in_binary() -> None:
    logits = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, length = encode_response(model="m", version="1", request_id="r", outputs={"logits": logits}, binary=True)
    assert length is not None
    got = np.frombuffer(body[length:], dtype="<f4")
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.0


def test_class_names_are_bytes_tensors_as_triton_sends_them() -> None:
    labels = class_labels(np.array([1, 0, 5]), ["setosa", "versicolor"])
    assert labels.tolist() == ["versicolor", "setosa", "5"]  # an id beyond the names: its number
    body, length = encode_response(model="m", version="1", request_id="r", outputs={"label": labels}, binary=False)
    assert decode(body)["outputs"] == [{"name": "label", "shape": [3], "datatype": "BYTES", "data": labels.tolist()}]
    one = class_labels(np.array([0]), ["é"])
    body, length = encode_response(model="m", version="1", request_id="r", outputs={"label": one}, binary=True)
    assert length is not None
    (out,) = decode(body[:length])["outputs"]
    assert out["datatype"] == "BYTES" and out["parameters"] == {"binary_data_size": 6}
    assert body[length:] == (2).to_bytes(4, "little") + "é".encode()
    assert tensor_metadata("label", "str", []) == {"name": "label", "datatype": "BYTES", "shape": [-1]}


# -- the strict input check ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    version = ModelVersion(
        model="iris",
        version="1",
        artifact="a",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 4, "classes": 3},
        task="classify",
        dataset="iris@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[4])],
    )
    return LoadedModel(version, weights_to_bytes(mlp(inputs=4, classes=3).state_dict()))


def test_inputs_must_be_exactly_the_declared_ones(loaded: LoadedModel) -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    assert loaded.check({"x": x}) is x
    with pytest.raises(BadRequest, match="unknown input 'zzz': model iris@1 declares 'x'"):
        loaded.check({"zzz": x})
    with pytest.raises(BadRequest, match="unknown input 'y': model iris@1 declares 'x'"):
        loaded.check({"x": x, "y": x})
    with pytest.raises(BadRequest, match=r"missing input 'x': model iris@1 declares 'x' \(got none\)"):
        loaded.check({})


def test_a_datatype_other_than_the_declared_one_is_named_not_cast(loaded: LoadedModel) -> None:
    for dtype, name in [(np.float64, "FP64 (float64)"), (np.int32, "INT32 (int32)"), (np.float16, "FP16 (float16)")]:
        with pytest.raises(BadRequest, match=rf"input 'x' must be FP32 \(float32\), got {re.escape(name)}"):
            loaded.check({"x": np.zeros((1, 4), dtype=dtype)})
    with pytest.raises(BadRequest, match=r"must have shape \[batch, 4\], got \[1, 3\]"):
        loaded.check({"x": np.zeros((1, 3), dtype=np.float32)})
    with pytest.raises(BadRequest, match=r"must have shape \[batch, 4\], got \[\]"):
        loaded.check({"x": np.zeros((), dtype=np.float32)})
    with pytest.raises(BadRequest, match="has no rows"):
        loaded.check({"x": np.zeros((0, 4), dtype=np.float32)})
    assert [oip_datatype(np.dtype(t)) for t in ("bool", "uint8", "int64", "float32", "<U3")] == [
        "BOOL",
        "UINT8",
        "INT64",
        "FP32",
        "BYTES",
    ]
