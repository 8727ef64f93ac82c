"""shared.coalesce: which requests travel together, and that each caller gets its own answer.

The sender here is a function over arrays (the router's is a NATS request to a worker, tested
through the real router in test_oip_conformance.py): these tests are about grouping rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.coalesce import Arrays, Coalescer, Served
from shared.errors import BadRequest, MeshTimeout
from shared.names import Names
from shared.schemas import ActorStats, ServiceStatus, StatusRequest
from tests.helpers import ServiceProcess
from tests.mesh import deploy_digits, register_mlp, start_gateway


class Worker:
    """Answers ``y = 2x`` per row; a row holding NaN is refused (400), as a worker refuses a
    request it cannot serve; records each request it got."""

    def __init__(self) -> None:
        self.requests: list[Arrays] = []
        self.fail_with: Exception | None = None

    async def send(self, inputs: Arrays) -> Served:
        self.requests.append(inputs)
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        if any(np.isnan(a).any() for a in inputs.values()):
            raise BadRequest("NaN in the input")
        return Served("1", {"y": inputs["x"] * 2, "n": np.arange(len(inputs["x"]))})


def rows(n: int, value: float, dtype: str = "float32", width: int = 4) -> Arrays:
    return {"x": np.full((n, width), value, dtype=dtype)}


async def together(coalescer: Coalescer, worker: Worker, *requests: Arrays, max_rows: int = 32) -> list[object]:
    """Every request in the same turn of the loop; results or exceptions, in order."""
    calls = [coalescer.infer("k", r, worker.send, max_rows=max_rows) for r in requests]
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_requests_in_one_turn_are_one_request_and_each_gets_its_rows() -> None:
    worker, coalescer = Worker(), Coalescer()
    got = await together(coalescer, worker, rows(1, 1.0), rows(3, 2.0), rows(2, 3.0))
    assert len(worker.requests) == 1 and len(worker.requests[0]["x"]) == 6
    for served, (n, value) in zip(got, [(1, 1.0), (3, 2.0), (2, 3.0)], strict=True):
        assert isinstance(served, Served)
        assert served.outputs["y"].shape == (n, 4) and (served.outputs["y"] == 2 * value).all()
    assert [list(s.outputs["n"]) for s in got if isinstance(s, Served)] == [[0], [1, 2, 3], [4, 5]]
    assert (coalescer.stats.groups, coalescer.stats.coalesced) == (1, 3)


async def test_a_lone_request_goes_as_it_came() -> None:
    worker, coalescer = Worker(), Coalescer()
    request = rows(2, 1.0)
    (served,) = await together(coalescer, worker, request)
    assert worker.requests == [request] and isinstance(served, Served)
    assert coalescer.stats.groups == 0


async def test_only_requests_that_could_be_one_are_grouped() -> None:
    worker, coalescer = Worker(), Coalescer()
    await together(
        coalescer,
        worker,
        rows(1, 1.0),
        rows(1, 1.0, dtype="float64"),  # another dtype
        rows(1, 1.0, width=5),  # another row shape
        rows(1, 1.0),
        {"x": np.zeros((0, 4), np.float32)},  # no rows: never grouped
        {"x": np.float32(1.0)},  # a scalar: never grouped
    )
    sizes = sorted(len(np.atleast_1d(r["x"])) for r in worker.requests)
    assert len(worker.requests) == 5 and sizes == [0, 1, 1, 1, 2]


async def test_other_keys_are_not_grouped() -> None:
    worker, coalescer = Worker(), Coalescer()
    await asyncio.gather(
        coalescer.infer("a", rows(1, 1.0), worker.send, max_rows=32),
        coalescer.infer("b", rows(1, 1.0), worker.send, max_rows=32),
    )
    assert len(worker.requests) == 2


async def test_a_group_holds_at_most_max_rows_and_max_bytes() -> None:
    worker, coalescer = Worker(), Coalescer()
    got = await together(coalescer, worker, *[rows(3, float(i)) for i in range(5)], max_rows=8)
    assert sorted(len(r["x"]) for r in worker.requests) == [3, 6, 6]
    assert all(isinstance(s, Served) and (s.outputs["y"] == 2 * i).all() for i, s in enumerate(got))

    worker, coalescer = Worker(), Coalescer(max_bytes=100)
    await together(coalescer, worker, *[rows(1, 1.0, width=8) for _ in range(4)])  # 32 bytes a request
    assert sorted(len(r["x"]) for r in worker.requests) == [1, 3]


async def test_a_content_error_sends_each_alone_so_only_the_bad_request_fails() -> None:
    worker, coalescer = Worker(), Coalescer()
    got = await together(coalescer, worker, rows(1, 1.0), rows(2, float("nan")), rows(1, 3.0))
    assert isinstance(got[1], BadRequest)
    assert isinstance(got[0], Served) and isinstance(got[2], Served) and (got[2].outputs["y"] == 6).all()
    assert len(worker.requests) == 4 and coalescer.stats.isolated == 1


async def test_a_timeout_is_every_members_answer() -> None:
    worker, coalescer = Worker(), Coalescer()
    worker.fail_with = MeshTimeout("aimesh.infer.m.1", 1.0)
    got = await together(coalescer, worker, rows(1, 1.0), rows(1, 2.0), rows(1, 3.0))
    assert len(worker.requests) == 1  # not sent again: it may have run
    assert all(isinstance(e, MeshTimeout) for e in got)


async def test_a_caller_that_gives_up_is_left_out_and_the_others_are_served() -> None:
    worker, coalescer = Worker(), Coalescer()
    leaving = asyncio.ensure_future(coalescer.infer("k", rows(5, 9.0), worker.send, max_rows=32))
    staying = asyncio.ensure_future(coalescer.infer("k", rows(1, 1.0), worker.send, max_rows=32))
    await asyncio.sleep(0)  # both joined the group
    leaving.cancel()
    served = await staying
    assert (served.outputs["y"] == 2).all()
    assert [len(r["x"]) for r in worker.requests] == [1]
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_outputs_that_are_not_one_per_row_send_each_alone() -> None:
    async def summary(inputs: Arrays) -> Served:
        calls.append(len(inputs["x"]))
        return Served("1", {"total": np.array([inputs["x"].sum()])})

    calls: list[int] = []
    coalescer = Coalescer()
    got = await asyncio.gather(*[coalescer.infer("k", rows(2, 1.0), summary, max_rows=32) for _ in range(3)])
    assert calls == [6, 2, 2, 2] and all(s.outputs["total"].shape == (1,) for s in got)


# -- through a real router and worker -----------------------------------------------------------
def infer_stats(status: ServiceStatus) -> ActorStats:
    return next(a for a in status.actors if a.name == "infer-digits-1")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("coalesce", [True, False])
async def test_concurrent_http_requests_share_worker_requests_and_each_gets_its_own_outputs(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, coalesce: bool
) -> None:
    _, _, base = await start_gateway(
        spawn, nats_url, names, router_env={"AIMESH_ROUTER_COALESCE": str(coalesce).lower()}
    )
    await deploy_digits(nc, names)
    _, model = await register_mlp(nc, names, seed=1)  # the same weights, to compute the expected outputs here
    x = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    sizes = [1 + i % 3 for i in range(48)]  # 96 rows in 48 requests, over 64 rows: several groups
    starts = np.cumsum([0, *sizes])[:-1] % 62

    async def one(http: aiohttp.ClientSession, start: int, n: int) -> tuple[int, list[int]]:
        body = {
            "inputs": [
                {"name": "x", "shape": [n, 64], "datatype": "FP32", "data": x[start : start + n].ravel().tolist()}
            ]
        }
        async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
            out = {o["name"]: o for o in (await resp.json())["outputs"]}
            return start, out["class"]["data"]

    before = infer_stats(await request(nc, names.service_status("inference"), StatusRequest(), ServiceStatus)).requests
    async with aiohttp.ClientSession() as http:
        got = await asyncio.gather(*[one(http, int(s), n) for s, n in zip(starts, sizes, strict=True)])
    after = infer_stats(await request(nc, names.service_status("inference"), StatusRequest(), ServiceStatus)).requests
    with torch.no_grad():
        want = model(torch.from_numpy(x)).argmax(-1).tolist()
    for (start, classes), n in zip(got, sizes, strict=True):
        assert classes == want[start : start + n]  # each caller got its own rows' answers, in order
    if coalesce:
        assert after - before < len(sizes), f"{after - before} worker requests for {len(sizes)} HTTP requests"
    else:
        assert after - before == len(sizes)
