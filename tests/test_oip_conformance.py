"""Open Inference Protocol v2 conformance, as KServe/Triton clients expect it, over real HTTP to a
real router and inference worker (on a real nats-server) serving a trained classifier: unknown
models and versions are 404 (never a retryable 503), inputs are exactly the declared ones,
metadata describes inputs, outputs, versions and class names, ready says which model it answers
for, and outputs are valid JSON whatever their values.  See docs/serving.md, "HTTP gateway"."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.datasets import encode_manifest
from shared.errors import BadRequest
from shared.kv import open_bucket
from shared.names import Names, dataset_latest_key, manifest_key
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    ColumnSpec,
    DatasetManifest,
    Deployment,
    DeployRequest,
    InferReply,
    InferRequest,
    ModelVersion,
)
from shared.tensors import from_wire, to_wire
from tests.helpers import ServiceProcess, eventually, oip_error, send
from tests.mesh import serving, start_gateway
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp

pytestmark = pytest.mark.slow

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SPECIES = ["setosa", "versicolor", "virginica"]
CENTRES = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]], dtype=np.float32)


def trained_classifier() -> torch.nn.Module:
    """An MLP trained (here, in a second) to tell three clusters apart, like iris."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = (CENTRES[y] + rng.normal(0, 0.1, (600, 4))).astype(np.float32)
    model = mlp(inputs=4, classes=3, hidden=[16])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model.eval()


async def register_iris(nc: NatsClient, names: Names, artifact: str, model: torch.nn.Module | None = None) -> str:
    """A version as the trainer records it: input column x, the dataset, the class names; with
    ``model``, its weights are stored as ``artifact`` (else ``artifact`` is only named)."""
    js = nc.jetstream()
    if model is not None:
        await put_object(await artifacts(js, names), artifact, weights_to_bytes(model.state_dict()))
    version = ModelVersion(
        model="iris",
        version="",
        artifact=artifact,
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 4, "classes": 3, "hidden": [16]},
        task="classify",
        dataset="iris@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[4])],
        label_classes=SPECIES,
    )
    return (await register(await js.key_value(names.registry_bucket), version)).version


async def store_manifest(nc: NatsClient, names: Names) -> None:
    """The manifest of the dataset iris@1, as ingest leaves it (features packed into x)."""
    manifest = DatasetManifest(
        dataset="iris",
        version="1",
        format="csv",
        columns=[ColumnSpec(name="x", dtype="float32", shape=[4]), ColumnSpec(name="y", dtype="int64")],
        features=FEATURES,
        label="species",
        label_classes=SPECIES,
        classes=3,
        sharding="round_robin",
        shards=[],
        records=600,
        rejected=0,
        bytes=0,
        created_at="2026-01-01T00:00:00Z",
        sources=["iris.csv"],
        fingerprint="f",
        job_id="j",
    )
    kv = await open_bucket(nc.jetstream(), names.datasets_bucket, create=True)
    assert kv is not None
    await kv.put(manifest_key("iris", "1"), encode_manifest(manifest))
    await kv.put(dataset_latest_key("iris"), b"1")


def tensor(name: str, x: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


async def post_binary(
    http: aiohttp.ClientSession, url: str, x: np.ndarray, binary_output: str | None = None
) -> tuple[bytes, int | None]:
    """``x`` sent with the binary tensor extension (as Triton's clients do), ``binary_output``
    asked for as binary; the response body and its JSON header's length (None: all JSON)."""
    wanted = [{"name": binary_output, "parameters": {"binary_data": True}}] if binary_output else []
    input_ = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    header = json.dumps({"inputs": [input_], "outputs": wanted}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    async with http.post(url, data=header + x.tobytes(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        length = resp.headers.get("Inference-Header-Content-Length")
        return await resp.read(), int(length) if length is not None else None


@pytest.fixture
async def iris(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> tuple[str, torch.nn.Module]:
    """A router and a worker serving iris@1 (trained); iris@2 is registered but not deployed,
    iris@3 is deployed but cannot load (its weights are missing)."""
    worker, _, base = await start_gateway(spawn, nats_url, names)
    model = trained_classifier()
    await store_manifest(nc, names)
    trained = "models/iris/trained.safetensors"
    assert await register_iris(nc, names, trained, model) == "1"
    await request(nc, names.deploy, DeployRequest(model="iris"), Deployment)  # latest: requests go to 1
    assert await register_iris(nc, names, trained) == "2"
    assert await register_iris(nc, names, "models/iris/missing.safetensors") == "3"
    await request(nc, names.deploy, DeployRequest(model="iris", ref="3"), Deployment)
    try:
        await eventually(lambda: serving(nc, names, "iris@1"), 60, "the worker to serve iris@1")
    except AssertionError:
        raise AssertionError(worker.output()[-4000:]) from None
    return base, model


async def test_unknown_models_and_versions_are_404_and_unserved_ones_503(
    iris: tuple[str, torch.nn.Module], http: aiohttp.ClientSession
) -> None:
    base, _ = iris
    body = {"inputs": [tensor("x", CENTRES[:1])]}
    durable = {"Prefer": "respond-async"}
    for path, contains in [
        ("/v2/models/iris/versions/99", "version '99' of model 'iris' is not deployed (deployed: 1, 3;"),
        ("/v2/models/iris/versions/2", "version '2' of model 'iris' is not deployed"),  # registered only
        ("/v2/models/nope", "model 'nope' is not deployed"),
        ("/v2/models/nope/versions/1", "model 'nope' is not deployed"),
    ]:
        for headers in (None, durable):
            status, out, _ = await send(http, "POST", base, f"{path}/infer", json=body, headers=headers)
            oip_error(status, out, 404, contains=contains)
        status, out, _ = await send(http, "GET", base, f"{path}/ready")
        oip_error(status, out, 404, contains=contains)
    # Metadata describes any registered version; 404 for what the registry does not have.
    for path, contains in [
        ("/v2/models/iris/versions/99", "model 'iris' has no version 99"),
        ("/v2/models/nope", "model 'nope' has no version or alias 'latest'"),
    ]:
        status, out, _ = await send(http, "GET", base, path)
        oip_error(status, out, 404, contains=contains)
    status, meta, _ = await send(http, "GET", base, "/v2/models/iris/versions/2")
    assert status == 200 and meta["parameters"]["version"] == "2" and meta["versions"] == ["1", "3"], meta

    # Ready: which model (and version) it answers for; 503 while deployed but not served.
    status, out, _ = await send(http, "GET", base, "/v2/models/iris/ready")
    assert (status, out) == (200, {"name": "iris", "ready": True})
    status, out, _ = await send(http, "GET", base, "/v2/models/iris/versions/1/ready")
    assert (status, out) == (200, {"name": "iris", "ready": True, "version": "1"})
    status, out, _ = await send(http, "GET", base, "/v2/models/iris/versions/3/ready")
    assert (status, out) == (503, {"name": "iris", "ready": False, "version": "3"})
    status, out, _ = await send(http, "POST", base, "/v2/models/iris/versions/3/infer", json=body)
    oip_error(status, out, 503, contains="no inference worker serves iris@3")


async def test_inputs_are_exactly_the_declared_names_and_datatypes_over_http_and_nats(
    iris: tuple[str, torch.nn.Module], http: aiohttp.ClientSession, nc: NatsClient, names: Names
) -> None:
    base, _ = iris
    x = CENTRES[:1]
    for inputs, contains in [
        ([tensor("y", x)], "unknown input 'y': model iris@1 declares 'x'"),
        ([tensor("zzz", x)], "unknown input 'zzz': model iris@1 declares 'x'"),
        ([tensor("x", x), tensor("y", x)], "unknown input 'y'"),
        ([], "missing input 'x': model iris@1 declares 'x' (got none)"),
        ([tensor("x", x.astype(np.int32), "INT32")], "input 'x' must be FP32 (float32), got INT32 (int32)"),
        ([tensor("x", x.astype(np.float64), "FP64")], "input 'x' must be FP32 (float32), got FP64 (float64)"),
        ([tensor("x", x[:, :3])], "input 'x' must have shape [batch, 4], got [1, 3]"),
    ]:
        for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer"):
            status, out, _ = await send(http, "POST", base, path, json={"inputs": inputs})
            oip_error(status, out, 400, contains=contains)
    # NATS callers get the same check: the version's subject and the routed one.
    for subject in (names.infer("iris", "1"), names.infer_routed("iris")):
        for wire, match in [
            ({"y": to_wire(x)}, "unknown input 'y'"),
            ({"x": to_wire(x.astype(np.float64))}, r"must be FP32 \(float32\), got FP64 \(float64\)"),
        ]:
            with pytest.raises(BadRequest, match=match):
                await request(nc, subject, InferRequest(inputs=wire), InferReply)
    reply = await request(nc, names.infer_routed("iris"), InferRequest(inputs={"x": to_wire(x)}), InferReply)
    assert from_wire(reply.outputs["class"]).tolist() == [0]


async def test_metadata_describes_versions_inputs_outputs_and_class_names(
    iris: tuple[str, torch.nn.Module], http: aiohttp.ClientSession
) -> None:
    base, _ = iris
    status, meta, _ = await send(http, "GET", base, "/v2/models/iris")
    assert status == 200, meta
    assert meta["name"] == "iris" and meta["versions"] == ["1", "3"] and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "class", "datatype": "INT64", "shape": [-1]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert meta["parameters"] == {
        "version": "1",
        "task": "classify",
        "dataset": "iris@1",
        "input_columns": FEATURES,
        "label_column": "species",
        "label_classes": SPECIES,
    }


async def test_class_names_come_back_when_asked_for_as_bytes_tensors(
    iris: tuple[str, torch.nn.Module], http: aiohttp.ClientSession
) -> None:
    base, _ = iris
    x = CENTRES[[2, 0, 1]]
    body: dict[str, Any] = {"inputs": [tensor("x", x)], "outputs": [{"name": "label"}, {"name": "class"}]}
    status, out, _ = await send(http, "POST", base, "/v2/models/iris/infer", json=body)
    assert status == 200, out
    by_name = {o["name"]: o for o in out["outputs"]}
    assert set(by_name) == {"label", "class"}
    want = ["virginica", "setosa", "versicolor"]
    assert by_name["label"] == {"name": "label", "shape": [3], "datatype": "BYTES", "data": want}
    assert by_name["class"]["data"] == [2, 0, 1]
    # Not asked for: the model's own outputs only.
    status, out, _ = await send(http, "POST", base, "/v2/models/iris/infer", json={"inputs": [tensor("x", x)]})
    assert {o["name"] for o in out["outputs"]} == {"logits", "class"}
    # Binary: each element's 4-byte little-endian length, then its UTF-8 bytes.
    raw, length = await post_binary(http, f"{base}/v2/models/iris/versions/1/infer", x, binary_output="label")
    assert length is not None
    (described,) = json.loads(raw[:length])["outputs"]
    assert described["datatype"] == "BYTES" and described["shape"] == [3]
    blob, labels = raw[length:], []
    while blob:
        n = int.from_bytes(blob[:4], "little")
        labels.append(blob[4 : 4 + n].decode())
        blob = blob[4 + n :]
    assert labels == want
    assert described["parameters"]["binary_data_size"] == len(raw) - length


async def test_non_finite_outputs_are_strings_in_json_and_ieee_in_binary(
    iris: tuple[str, torch.nn.Module], http: aiohttp.ClientSession
) -> None:
    base, model = iris
    x = np.array([[np.nan, 1, 1, 1], [3e38, -3e38, 3e38, 3e38], [5.0, 3.4, 1.5, 0.2]], dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert not np.isfinite(expected[:2]).all() and np.isfinite(expected[2]).all()
    raw, length = await post_binary(http, f"{base}/v2/models/iris/infer", x)
    assert length is None
    text = raw.decode()
    assert "null" not in text
    logits = next(o for o in json.loads(text)["outputs"] if o["name"] == "logits")
    spelled = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
    got = np.array([spelled[v] if isinstance(v, str) else v for v in logits["data"]], dtype=np.float32)
    np.testing.assert_allclose(got.reshape(3, 3), expected, rtol=1e-5, atol=1e-6)  # NaN == NaN here
    assert all(v in spelled for v in logits["data"] if isinstance(v, str))

    # Binary outputs: the IEEE values as they are.
    raw, length = await post_binary(http, f"{base}/v2/models/iris/infer", x, binary_output="logits")
    assert length is not None
    np.testing.assert_array_equal(np.frombuffer(raw[length:], dtype="<f4").reshape(3, 3), expected)
    msgspec.json.decode(raw[:length])  # the header is valid JSON
