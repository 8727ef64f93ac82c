"""Inference workers against a real nats-server: deploy from the registry, infer, batch, swap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.discovery import discover
from shared.errors import BadRequest, Unavailable
from shared.names import Names
from shared.registry import artifacts, put_object, register
from shared.schemas import ColumnSpec, Deployment, DeployRequest, InferReply, InferRequest, MicroPing, ModelVersion
from shared.tensors import from_wire, to_wire
from tests.helpers import ServiceProcess, eventually
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp

pytestmark = pytest.mark.slow


async def register_mlp(nc: NatsClient, names: Names, seed: int) -> tuple[ModelVersion, torch.nn.Module]:
    """A real MLP's weights in the artifacts store and a registry version pointing at them."""
    torch.manual_seed(seed)
    model = mlp(inputs=64, classes=10).eval()
    js = nc.jetstream()
    store = await artifacts(js, names)
    name = f"models/digits/seed{seed}.safetensors"
    await put_object(store, name, weights_to_bytes(model.state_dict()))
    kv = await js.key_value(names.registry_bucket)
    version = ModelVersion(
        model="digits",
        version="",
        artifact=name,
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 64, "classes": 10},
        task="classify",
        dataset="digits@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[64])],
    )
    return await register(kv, version), model


async def serving(nc: NatsClient, names: Names, want: str) -> bool:
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
    return bool(pings) and all(want in p.metadata.get("serving", "") for p in pings)


async def test_deploy_infer_batch_and_swap(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    worker = spawn("services.inference")
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    v1, model1 = await register_mlp(nc, names, seed=1)

    with pytest.raises(BadRequest, match="model 'nope' has no version or alias 'latest'"):
        await request(nc, names.deploy, DeployRequest(model="nope"), Deployment)
    deployed = await request(nc, names.deploy, DeployRequest(model="digits", max_batch_size=16), Deployment)
    assert deployed.version == v1.version == "1"
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the worker to serve digits@1")

    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    reply = await request(nc, names.infer("digits", "1"), InferRequest(inputs={"x": to_wire(x)}), InferReply)
    with torch.no_grad():
        expected = model1(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(from_wire(reply.outputs["logits"]), expected, rtol=1e-5)
    assert from_wire(reply.outputs["class"]).tolist() == [int(expected.argmax())]

    # Many at once: they share forward passes, and each gets its own rows back.
    xs = np.random.default_rng(1).random((64, 1, 64), dtype=np.float32)
    replies = await asyncio.gather(
        *(
            request(nc, names.infer("digits", "1"), InferRequest(inputs={"x": to_wire(row)}, id=str(i)), InferReply)
            for i, row in enumerate(xs)
        )
    )
    with torch.no_grad():
        all_logits = model1(torch.from_numpy(xs[:, 0])).numpy()
    for i, r in enumerate(replies):
        assert r.id == str(i)
        np.testing.assert_allclose(from_wire(r.outputs["logits"])[0], all_logits[i], rtol=1e-5)
    assert max(r.batch_size for r in replies) > 1

    with pytest.raises(BadRequest, match=r"must have shape \[batch, 64\], got \[1, 3\]"):
        await request(nc, names.infer("digits", "1"), InferRequest(inputs={"x": to_wire(x[:, :3])}), InferReply)

    # A new version: served on its own subject, then the old one is drained and dropped.
    await register_mlp(nc, names, seed=2)
    assert (await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)).version == "2"
    await eventually(lambda: serving(nc, names, "digits@2"), 30, "the worker to serve digits@2")
    reply2 = await request(nc, names.infer("digits", "2"), InferRequest(inputs={"x": to_wire(x)}), InferReply)
    assert reply2.version == "2"

    async def v1_gone() -> bool:
        try:
            await request(nc, names.infer("digits", "1"), InferRequest(inputs={"x": to_wire(x)}), InferReply)
            return False
        except Unavailable:
            return True

    await eventually(v1_gone, 30, "version 1 to be retired")
    worker.terminate()
    assert await asyncio.to_thread(worker.wait, 30) == 0
