"""The router's promises at its edges, against a real nats-server and real router processes:
mirrors, several routers on one port, deadlines passed on to the worker.

Where a test must see what reaches a worker, a stand-in worker (:mod:`tests.standin`) answers on
the version's subject."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared.client import request
from shared.kv import open_bucket
from shared.names import Header, Names
from shared.schemas import Deployment, DeployRequest, InferReply, InferRequest, MetricsSnapshot
from shared.tensors import to_wire
from tests.helpers import ServiceProcess, eventually, free_port
from tests.mesh import register_mlp, serving, start_gateway
from tests.standin import StandIn

pytestmark = pytest.mark.slow


def infer_body(x: np.ndarray, request_id: str = "") -> dict[str, object]:
    body: dict[str, object] = {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if request_id:
        body["id"] = request_id
    return body


async def deploy_record(nc: NatsClient, names: Names, model: str, version: str) -> None:
    """A deployment record, as `aimesh deploy` leaves it: routers route only to deployed versions
    (a stand-in worker then answers for it)."""
    kv = await open_bucket(nc.jetstream(), names.deployments_bucket, create=True)
    assert kv is not None
    record = Deployment(model=model, ref=version, version=version, updated_at="2026-01-01T00:00:00Z")
    await kv.put(f"deploy.{model}.{version}", msgspec.json.encode(record))


async def known(http: aiohttp.ClientSession, url: str, times: int = 1) -> bool:
    """Whether ``times`` readiness probes in a row find the version deployed (not a 404)."""
    for _ in range(times):
        async with http.get(url) as resp:
            if resp.status == 404:
                return False
    return True


async def test_a_mirror_gets_its_share_of_copies_and_never_answers_the_caller(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    _, _, base = await start_gateway(spawn, nats_url, names)
    _, model1 = await register_mlp(nc, names, seed=1)
    await register_mlp(nc, names, seed=2)  # a split names registered versions only; no worker loads it
    await request(nc, names.deploy, DeployRequest(model="digits", ref="1"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the worker to serve digits@1")
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model1(torch.from_numpy(x)).numpy()[0]
    n, percent = 300, 25
    split = {
        "model": "digits",
        "variants": [{"version": "1", "weight": 1}],
        "mirrors": [{"version": "2", "percent": percent}],
    }

    # Version 2's stand-in answers every copy at once, with logits no real model gives (999).
    async with StandIn(nc, names.infer("digits", "2"), "2", value=999.0) as mirror, aiohttp.ClientSession() as http:
        async with http.put(f"{base}/admin/splits/digits", json=split) as resp:
            assert resp.status == 200, await resp.text()  # this router applies it at once

        async def infer(i: int) -> None:
            async with http.post(f"{base}/v2/models/digits/infer", json=infer_body(x, f"m{i}")) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["Aimesh-Variant"] == "1"
                out = await resp.json()
            assert out["model_version"] == "1" and out["id"] == f"m{i}"
            logits = next(o for o in out["outputs"] if o["name"] == "logits")
            np.testing.assert_allclose(logits["data"], expected, rtol=1e-5, atol=1e-6)  # the primary's answer

        for start in range(0, n, 10):
            await asyncio.gather(*(infer(i) for i in range(start, start + 10)))

        # 25% of 300 is 75 copies, standard deviation 7.5: the bounds are more than 4.5 of them away.
        low, high = 40, 110

        async def enough() -> bool:
            return len(mirror.received) >= low

        await eventually(enough, 30, f"at least {low} copies at the mirror")
        copies = [r.id for r in mirror.received]
    assert len(copies) <= high, f"{len(copies)} copies of {n} requests for a {percent}% mirror"
    assert len(set(copies)) == len(copies) and set(copies) <= {f"m{i}" for i in range(n)}, copies


async def test_routers_on_one_port_share_its_connections(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    port = free_port()
    await deploy_record(nc, names, "digits", "1")  # before the routers start: both read it
    routers = [
        spawn("services.router", AIMESH_ROUTER_PORT=str(port), AIMESH_METRICS_INTERVAL_S="0.2") for _ in range(2)
    ]
    pings = [await r.wait_ready(nats_url, names.micro_name("router")) for r in routers]
    assert [p.metadata["http"] for p in pings] == [f"http://127.0.0.1:{port}"] * 2  # both listen on it
    instances = {p.id for p in pings}
    n = 40

    # Each router's own count of the requests it served, from its metric snapshots.
    served: dict[str, int] = {}

    async def on_snapshot(msg: Msg) -> None:
        snapshot = msgspec.msgpack.decode(msg.data, type=MetricsSnapshot)
        served[snapshot.instance] = sum(r.requests for r in snapshot.routes)

    await nc.subscribe(names.metrics("router", "*"), cb=on_snapshot)
    x = np.zeros((1, 64), dtype=np.float32)
    # A new connection per request: the kernel picks the listener per connection.
    connector = aiohttp.TCPConnector(force_close=True)
    async with StandIn(nc, names.infer("digits", "1"), "1"), aiohttp.ClientSession(connector=connector) as http:
        ready = f"http://127.0.0.1:{port}/v2/models/digits/versions/1/ready"  # probes are not counted
        await eventually(lambda: known(http, ready, times=10), 10, "both routers to know digits@1")
        for _ in range(n):
            async with http.post(
                f"http://127.0.0.1:{port}/v2/models/digits/versions/1/infer", json=infer_body(x)
            ) as resp:
                assert resp.status == 200, await resp.text()

        async def all_counted() -> bool:
            return set(served) == instances and sum(served.values()) == n

        await eventually(all_counted, 20, f"both routers' snapshots to count the {n} requests")
    assert all(count > 0 for count in served.values()), served  # 2 × 0.5^40 of failing by chance


async def test_the_deadline_reaches_the_worker_capped_at_the_routers_timeout(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    router = spawn("services.router", AIMESH_ROUTER_PORT="0")
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    await deploy_record(nc, names, "digits", "1")
    x = np.zeros((1, 64), dtype=np.float32)
    async with StandIn(nc, names.infer("digits", "1"), "1") as worker, aiohttp.ClientSession() as http:
        await eventually(lambda: known(http, f"{base}/v2/models/digits/versions/1/ready"), 10, "digits@1 deployed")
        # (asked, applied): below the cap as asked; above it, and unsaid, the cap (30 s).
        for asked_ms, applied_s in ((2_000, 2.0), (120_000, 30.0), (None, 30.0)):
            headers = {"Aimesh-Timeout-Ms": str(asked_ms)} if asked_ms is not None else {}
            sent_at = time.time()
            async with http.post(
                f"{base}/v2/models/digits/versions/1/infer", json=infer_body(x), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
            got = worker.received[-1]
            # The router set it when it sent the request: after sent_at, before the worker had it.
            deadline = int(got.headers[Header.DEADLINE])
            earliest, latest = int((sent_at + applied_s) * 1000), got.at_ms + applied_s * 1000
            assert earliest <= deadline <= latest, (asked_ms, deadline - earliest, latest - deadline)
        # A NATS caller of <prefix>.infer.<model> that allows itself 120 s gets the same cap.
        sent_at = time.time()
        req = InferRequest(inputs={"x": to_wire(x)})
        await request(nc, names.infer_routed("digits"), req, InferReply, timeout_s=120)
        got = worker.received[-1]
        deadline = int(got.headers[Header.DEADLINE])
        assert int((sent_at + 30) * 1000) <= deadline <= got.at_ms + 30_000, deadline - sent_at * 1000
