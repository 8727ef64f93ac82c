"""The typed Python client over NATS: infer with routing, durable submit/result, generation."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient

from aimesh.client import MeshClient
from shared.client import request
from shared.experiments import put_split
from shared.names import Names
from shared.schemas import ActorStats, Deployment, DeployRequest, ServiceStatus, Split, StatusRequest, Variant
from tests.helpers import ServiceProcess, eventually
from tests.mesh import register_lm, register_mlp, serving

SLOW_LM = {"dim": 64, "layers": 2, "heads": 2, "context": 128}  # ~2 ms a token

pytestmark = pytest.mark.slow


async def test_client_infers_submits_and_streams(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    worker = spawn("services.inference")
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    _, model1 = await register_mlp(nc, names, seed=1)
    await register_mlp(nc, names, seed=2)
    await register_lm(nc, names)
    await register_lm(nc, names, "long", SLOW_LM, no_eos=True)
    for model, ref in (("digits", "1"), ("digits", "2"), ("lm", "latest"), ("long", "latest")):
        await request(nc, names.deploy, DeployRequest(model=model, ref=ref), Deployment)
    for want in ("digits@1", "digits@2", "lm@1", "long@1"):
        await eventually(lambda w=want: serving(nc, names, w), 30, want)  # type: ignore[misc]
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)

    async with await MeshClient.connect(nats_url, names.prefix) as mesh:
        one = await mesh.infer("digits", x, version="1")
        with torch.no_grad():
            np.testing.assert_allclose(one.outputs["logits"], model1(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
        assert (await mesh.infer("digits", {"x": x})).version == "2"  # the most recent deployment

        split = Split(
            model="digits", variants=[Variant(version="1", weight=1), Variant(version="2", weight=1)], sticky="X-User"
        )
        await put_split(nc.jetstream(), names, split)
        await eventually(lambda: _has_split(mesh), 10, "the client to see the split")
        seen = {u: (await mesh.infer("digits", x[:1], sticky_key=u)).version for u in ("a", "b", "c", "d", "e", "f")}
        assert set(seen.values()) == {"1", "2"}
        for user, variant in seen.items():
            assert (await mesh.infer("digits", x[:1], sticky_key=user)).version == variant

        rid = await mesh.submit("digits", x[:1], version="1", id="client-1")
        outcome = await mesh.result(rid, wait_s=20)
        assert outcome.state == "done" and outcome.version == "1"

        text = "".join([t async for t in mesh.generate("lm", "def main():", max_tokens=12, temperature=0)])
        assert len(text) > 0

        # Leaving a generation early cancels it on the worker (4096 tokens would take seconds).
        async for _ in mesh.generate("long", "x", max_tokens=4096, temperature=0):
            break
        t0 = time.monotonic()
        stopped = await eventually(lambda: _generation_stopped(nc, names, "long"), 10, "the generation to stop")
        assert time.monotonic() - t0 < 2.0, "the generation ran on after the client left it"
        assert stopped.extra["cancelled"] == 1


async def _generation_stopped(nc: NatsClient, names: Names, model: str) -> ActorStats | None:
    status = await request(nc, names.service_status("inference"), StatusRequest(), ServiceStatus)
    stats = next(a for a in status.actors if a.name == f"generate-{model}-1")
    return stats if stats.extra["generating"] == 0 and stats.in_flight == 0 else None


async def _has_split(mesh: MeshClient) -> bool:
    return "digits" in mesh.table.splits
