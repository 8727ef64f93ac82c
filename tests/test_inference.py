"""Inference workers against a real nats-server: deploy from the registry, infer, batch, swap."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from shared import durable
from shared.client import request
from shared.discovery import discover
from shared.errors import BadRequest, MeshTimeout, NotFound, Unavailable
from shared.names import Header, Names
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    ColumnSpec,
    Deployment,
    DeployRequest,
    DurableResult,
    InferReply,
    InferRequest,
    MicroPing,
    MicroStats,
    ModelVersion,
)
from shared.tensors import from_wire, to_wire
from tests.helpers import AIMESH, ROOT, ServiceProcess, clean_env, eventually, free_port
from tests.mesh import deploy_digits, register_mlp, serving, start_gateway
from tests.otlp import KIND_CLIENT, KIND_CONSUMER, KIND_INTERNAL, KIND_SERVER, OtlpReceiver
from tests.standin import StandIn
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp

pytestmark = pytest.mark.slow


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
    np.testing.assert_allclose(from_wire(reply.outputs["logits"]), expected, rtol=1e-5, atol=1e-6)
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
        np.testing.assert_allclose(from_wire(r.outputs["logits"])[0], all_logits[i], rtol=1e-5, atol=1e-6)
    assert max(r.batch_size for r in replies) > 1
    # The batcher's counters reach discovery (and from there Prometheus).
    stats = await discover(nc, "STATS", MicroStats, name=names.micro_name("inference"))
    data = next(e for e in stats[0].endpoints if e.name == "infer-digits-1").data or {}
    assert (
        data["batch_rows"] == 65 and data["batches"] < 65 and set(data["batch_reasons"]) <= {"free", "full", "max_wait"}
    )

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


async def test_the_http_gateway_speaks_the_open_inference_protocol(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import json

    import aiohttp

    worker, router, base = await start_gateway(
        spawn, nats_url, names, router_env={"AIMESH_ROUTER_MAX_BODY_BYTES": "100000"}
    )
    _, model = await register_mlp(nc, names, seed=3)
    await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the worker to serve digits@1")
    x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()

    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.get(f"{base}/v2/models/digits/ready") as resp:
                return resp.status == 200

        await eventually(ready, 30, "the model to be ready at the gateway")
        async with http.get(f"{base}/v2/models/digits") as resp:
            meta = await resp.json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
        assert {o["name"] for o in meta["outputs"]} == {"logits", "class"}

        body = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
            assert resp.status == 200
            out = await resp.json()
        assert out["model_name"] == "digits" and out["model_version"] == "1" and out["id"] == "r1"
        logits = next(o for o in out["outputs"] if o["name"] == "logits")
        np.testing.assert_allclose(np.array(logits["data"]).reshape(logits["shape"]), expected, rtol=1e-5, atol=1e-6)

        # The binary tensor data extension, both ways (what Triton's clients send by default).
        header = json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        async with http.post(
            f"{base}/v2/models/digits/versions/1/infer",
            data=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        ) as resp:
            assert resp.status == 200
            raw = await resp.read()
            length = int(resp.headers["Inference-Header-Content-Length"])
        described = json.loads(raw[:length])["outputs"]
        assert [o["name"] for o in described] == ["logits"]
        got = np.frombuffer(raw[length:], dtype=np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        cases = [
            ("/v2/models/nothing/infer", body, 404, "is not deployed"),
            # A version nobody deployed: 404 (a 503 would have clients retry), naming what is.
            (
                "/v2/models/digits/versions/9/infer",
                body,
                404,
                "version '9' of model 'digits' is not deployed (deployed: 1;",
            ),
            (
                "/v2/models/digits/infer",
                {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
                400,
                "must have shape [batch, 64]",
            ),
            (
                "/v2/models/digits/infer",
                {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [1]}]},
                400,
                "1 values do not fit shape [1, 64]",
            ),
            ("/v2/models/digits/infer", {"nope": 1}, 400, "invalid inference request"),
        ]
        for path, payload, status, message in cases:
            async with http.post(f"{base}{path}", json=payload) as resp:
                assert resp.status == status, (path, await resp.text())
                assert message in (await resp.json())["error"]
        async with http.post(f"{base}/v2/models/digits/infer", data=b"x" * 200_000) as resp:
            assert resp.status == 413 and "over the limit" in (await resp.json())["error"]
    for proc in (router, worker):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_ab_split_is_sticky_live_and_reversible(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import subprocess

    import aiohttp

    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_mlp(nc, names, seed=1)
    await register_mlp(nc, names, seed=2)
    for ref in ("1", "2"):
        await request(nc, names.deploy, DeployRequest(model="digits", ref=ref), Deployment)
    await eventually(lambda: serving(nc, names, "digits@2"), 30, "both versions to be served")
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "both versions to be served")

    def aimesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AIMESH, *args, "--nats-url", nats_url, "--prefix", names.prefix],
            cwd=ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = await asyncio.to_thread(aimesh, "split", "digits", "1=50", "2=50", "--sticky", "X-User")
    assert done.returncode == 0 and "digits: v1 50, v2 50; sticky by X-User" in done.stdout, done.stderr
    x = np.zeros((1, 64), dtype=np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    async with aiohttp.ClientSession() as http:

        async def variant(user: str | None) -> str:
            headers = {"X-User": user} if user else {}
            async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["model_version"] == resp.headers["Aimesh-Variant"]
                return resp.headers["Aimesh-Variant"]

        async def split_applied() -> bool:
            async with http.get(f"{base}/admin/splits/digits") as resp:
                return resp.status == 200

        await eventually(split_applied, 10, "the router to see the split")
        first = {u: await variant(f"user-{u}") for u in range(40)}
        assert set(first.values()) == {"1", "2"}
        again = {u: await variant(f"user-{u}") for u in range(40)}
        assert again == first  # sticky
        unkeyed = [await variant(None) for _ in range(30)]
        assert set(unkeyed) == {"1", "2"}  # weighted at random

        bad = await asyncio.to_thread(aimesh, "split", "digits", "1=50", "7=50")
        assert bad.returncode == 2 and "has no version 7" in bad.stderr
        cleared = await asyncio.to_thread(aimesh, "split", "digits", "--clear")
        assert cleared.returncode == 0

        async def split_gone() -> bool:
            async with http.get(f"{base}/admin/splits/digits") as resp:
                return resp.status == 404

        await eventually(split_gone, 10, "the split to be removed")
        after = [await variant(f"user-{u}") for u in range(10)]
        assert set(after) == {"2"}  # the most recent deployment


async def test_one_trace_from_http_to_the_batch_forward(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, otlp: tuple[object, str]
) -> None:
    import aiohttp

    receiver, url = otlp
    assert isinstance(receiver, OtlpReceiver)
    traced = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "AIMESH_TRACE_SAMPLE_RATIO": "1",
    }
    worker, router, base = await start_gateway(spawn, nats_url, names, router_env=traced, worker_env=traced)
    await deploy_digits(nc, names, timeout_s=30)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
        assert resp.status == 200
    for proc in (router, worker):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0  # the drain flushes spans

    spans = receiver.spans
    server = next(s for s in spans if s.kind == KIND_SERVER and "infer" in s.name)
    assert server.name == "POST /v2/models/{model}/infer" and server.parent_id == ""
    send = next(s for s in spans if s.kind == KIND_CLIENT and s.trace_id == server.trace_id)
    process = next(s for s in spans if s.kind == KIND_CONSUMER and s.trace_id == server.trace_id)
    forward = next(s for s in spans if s.kind == KIND_INTERNAL and s.name == "forward digits")
    assert send.parent_id == server.span_id and process.parent_id == send.span_id
    assert forward.trace_id == server.trace_id and forward.parent_id == process.span_id
    assert forward.links == [process.span_id] and forward.attributes["aimesh.batch.size"] == 1


class DurableProbe:
    """What JetStream says of digits@1's durable requests: the consumer every worker of it
    fetches from, and the requests and results streams."""

    consumer = "infer-digits-1"

    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self.js, self.names = js, names

    async def consumer_info(self) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(self.names.requests_stream, self.consumer)
        return info

    async def delivered(self) -> tuple[int, int]:
        """The consumer's last delivery: its own sequence (one per delivery) and the stream's."""
        last = (await self.consumer_info()).delivered
        assert last is not None
        return last.consumer_seq, last.stream_seq

    async def last_seqs(self) -> tuple[int, int]:
        """How many messages the requests and the results streams ever stored."""
        requests_state = (await self.js.stream_info(self.names.requests_stream)).state
        results_state = (await self.js.stream_info(self.names.results_stream)).state
        return requests_state.last_seq, results_state.last_seq

    async def settled(self) -> ConsumerInfo | None:
        info = await self.consumer_info()
        # Delivered to the frozen worker (unacked), or left in the stream (its fetch expired).
        return info if info.num_ack_pending or (not info.num_waiting and info.num_pending) else None

    async def idle(self) -> bool:
        info = await self.consumer_info()
        return not info.num_ack_pending and not info.num_pending


class DurableClient:
    """``n`` requests for digits, submitted over HTTP with ``Prefer: respond-async`` in order,
    some at a time, and their answers read back."""

    def __init__(self, http: aiohttp.ClientSession, base: str, xs: np.ndarray) -> None:
        self.http, self.base, self.xs = http, base, xs
        self.n = len(xs)
        self.submitted = 0

    def body(self, i: int) -> dict[str, Any]:
        return {
            "id": f"d{i}",
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": self.xs[i].ravel().tolist()}],
        }

    async def submit(self, i: int) -> None:
        headers = {"Prefer": "respond-async"}
        async with self.http.post(f"{self.base}/v2/models/digits/infer", json=self.body(i), headers=headers) as resp:
            assert resp.status == 202 and resp.headers["Location"] == f"/v2/results/d{i}"

    async def submit_next(self, count: int) -> None:
        end = min(self.submitted + count, self.n)
        await asyncio.gather(*(self.submit(i) for i in range(self.submitted, end)))
        self.submitted = end

    async def logits(self, i: int) -> list[float] | None:
        """The answer's logits; None while it is pending."""
        async with self.http.get(f"{self.base}/v2/results/d{i}") as resp:
            if resp.status == 202:
                return None
            assert resp.status == 200, await resp.text()
            logits: list[float] = next(o for o in (await resp.json())["outputs"] if o["name"] == "logits")["data"]
            return logits

    async def all_answered(self) -> dict[int, list[float]] | None:
        answers = {}
        for i in range(self.n):
            logits = await self.logits(i)
            if logits is None:
                return None
            answers[i] = logits
        return answers


class ResultRecorder:
    """Every publish on the result subjects as sent, whether the stream stored it or not: per
    request id, each (state, Nats-Msg-Id)."""

    def __init__(self) -> None:
        self.published: defaultdict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.decoder = msgspec.msgpack.Decoder(DurableResult)

    async def on_result(self, msg: Msg) -> None:
        outcome = self.decoder.decode(msg.data)
        self.published[outcome.id].append((outcome.state, (msg.headers or {}).get(Header.MSG_ID)))

    async def every_answer_seen(self, n: int) -> bool:
        return all(any(state != "pending" for state, _ in self.published[f"d{i}"]) for i in range(n))

    def answer_msg_ids(self, i: int) -> list[str | None]:
        return [msg_id for state, msg_id in self.published[f"d{i}"] if state != "pending"]


async def hold_requests_in_a_frozen_worker(worker: ServiceProcess, client: DurableClient, probe: DurableProbe) -> int:
    """Freeze ``worker`` (SIGSTOP) with requests delivered to it and unacked; how many it holds.
    Frozen, it takes requests only through the fetch it left waiting, and acks none.  If that fetch
    expired before the requests came, it serves them, and we try again."""
    held = 0
    for _ in range(5):
        os.kill(worker.pid, signal.SIGSTOP)
        await client.submit_next(16)
        held = (await eventually(probe.settled, 10, "the requests to reach the frozen worker")).num_ack_pending or 0
        if held:
            break
        os.kill(worker.pid, signal.SIGCONT)
        await eventually(probe.idle, 30, "the first worker to serve what it was sent")
    assert held, "the frozen worker never held a request: its fetch had expired each time"
    return held


async def assert_the_same_id_is_the_same_request(
    client: DurableClient, probe: DurableProbe, answers: dict[int, list[float]], seqs: tuple[int, int]
) -> None:
    """The same id again is the same request: nothing new is stored or delivered, the answer
    stands; a second answer for an id that has one (what a redelivered request's run publishes)
    is dropped by the stream.  ``seqs``: the streams' last sequences once every id was answered."""
    deliveries = await probe.delivered()
    again = json.dumps(client.body(7))
    async with client.http.post(f"{client.base}/v2/models/digits/infer?async=1", data=again) as resp:
        assert resp.status == 202
    assert await probe.last_seqs() == seqs
    assert await probe.delivered() == deliveries
    assert await client.logits(7) == answers[7]
    late = DurableResult(id="d7", state="error", model="digits", version="1", error="a second answer", code=500)
    await durable.store_result(probe.js, probe.names, late)
    assert await probe.last_seqs() == seqs
    assert (await durable.fetch(probe.js, probe.names, "d7")).state == "done"
    async with client.http.get(f"{client.base}/v2/results/nobody") as resp:
        assert resp.status == 404


async def test_durable_requests_survive_a_killed_worker_and_are_answered_once(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    """The first worker is frozen (SIGSTOP) while requests it was delivered wait unacked in it,
    then killed; a second worker serves everything, those after the ack wait.  Every publish on
    the result subjects is recorded as sent, and the streams' sequences count what was stored."""
    env = {"AIMESH_INFERENCE_DURABLE_ACK_WAIT_S": "2"}
    first = spawn("services.inference", **env)
    router = spawn("services.router", AIMESH_ROUTER_PORT="0")
    await first.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    _, model = await register_mlp(nc, names, seed=4)
    await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the first worker to serve digits@1")
    js = nc.jetstream()
    probe = DurableProbe(js, names)
    recorder = ResultRecorder()
    await nc.subscribe(names.result_subjects, cb=recorder.on_result)
    await nc.flush()
    n = 200
    xs = np.random.default_rng(2).random((n, 1, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(xs[:, 0])).numpy()

    async with aiohttp.ClientSession() as http:
        client = DurableClient(http, base, xs)
        held = await hold_requests_in_a_frozen_worker(first, client, probe)
        while client.submitted < n:
            await client.submit_next(16)
        os.kill(first.pid, signal.SIGKILL)  # with `held` requests delivered and unacked
        second = spawn("services.inference", **env)
        await second.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)

        answers = await eventually(client.all_answered, 60, "every durable request to be answered")
        for i, logits in answers.items():
            np.testing.assert_allclose(logits, expected[i], rtol=1e-5, atol=1e-6)

        # The kill left unacked work, and it was delivered again: every delivery, a redelivery
        # too, takes the consumer's next sequence.
        requests_seq, results_seq = await probe.last_seqs()
        assert requests_seq == n
        redelivered = (await probe.delivered())[0] - requests_seq
        assert redelivered >= held > 0, f"{held} requests held by the killed worker, {redelivered} redelivered"

        # Each answer was published once, or its copies were collapsed by id: every answer
        # published for an id carries the same Nats-Msg-Id, and the results stream stored one
        # pending record (each was submitted while no worker could answer it) and one answer per id.
        await eventually(lambda: recorder.every_answer_seen(n), 10, "every answer's publish to reach the test")
        for i in range(n):
            msg_ids = recorder.answer_msg_ids(i)
            assert set(msg_ids) == {f"d{i}/result"}, f"d{i}: answers published as {msg_ids}"
        assert results_seq == 2 * n, (
            f"{results_seq - 2 * n} more messages stored than one pending and one answer per id"
        )
        await assert_the_same_id_is_the_same_request(client, probe, answers, (requests_seq, results_seq))

    # Straight from a NATS client, a bad request's answer is its error.
    bad = InferRequest(inputs={"x": to_wire(np.zeros((1, 3), dtype=np.float32))}, id="bad1")
    rid = await durable.submit(js, names, "digits", "1", bad)

    async def bad_answered() -> bool:
        return (await durable.fetch(js, names, rid)).state == "error"

    await eventually(bad_answered, 30, "the bad request's error")
    outcome = await durable.fetch(js, names, rid)
    assert outcome.code == 400 and "must have shape" in outcome.error


async def test_moving_an_alias_swaps_versions_with_no_failed_request(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import aiohttp

    from shared.registry import set_alias

    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_mlp(nc, names, seed=1)
    await register_mlp(nc, names, seed=2)
    kv = await nc.jetstream().key_value(names.registry_bucket)
    await set_alias(kv, "digits", "stable", "1")
    await request(nc, names.deploy, DeployRequest(model="digits", ref="stable"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "digits@1 (stable)")
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    statuses: list[int] = []
    versions: list[str] = []
    stop = asyncio.Event()

    async def load(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
                statuses.append(resp.status)
                if resp.status == 200:
                    versions.append(resp.headers["Aimesh-Variant"])

    async with aiohttp.ClientSession() as http:
        clients = [asyncio.create_task(load(http)) for _ in range(8)]
        await eventually(lambda: _some(statuses, 50), 20, "load to flow")
        await set_alias(kv, "digits", "stable", "2")  # move the alias, then redeploy the same ref
        await request(nc, names.deploy, DeployRequest(model="digits", ref="stable"), Deployment)

        async def only_v2() -> bool:
            return versions[-20:] == ["2"] * 20 if len(versions) > 20 else False

        await eventually(only_v2, 30, "traffic to move to version 2")
        stop.set()
        await asyncio.gather(*clients)
    assert set(statuses) == {200}, f"failed requests during the swap: {sorted(set(statuses))}"
    # Load ran before the move and through it (only_v2 needs 20 answers after it): a count of
    # requests, not a rate, as CI machines vary.
    assert versions[0] == "1" and versions[-1] == "2"


async def _some(items: list[int], n: int) -> bool:
    return len(items) >= n


async def _routes_to_9(http: Any, base: str, body: dict[str, Any], headers: dict[str, str]) -> bool:
    """Whether the router knows digits@9 is deployed (no worker serves it: 503, not 404)."""
    async with http.post(f"{base}/v2/models/digits/versions/9/infer", json=body, headers=headers) as resp:
        return bool(resp.status == 503)


async def test_api_keys_scopes_deadlines_and_the_concurrency_bound(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import aiohttp

    router = spawn(
        "services.router",
        AIMESH_ROUTER_PORT="0",
        AIMESH_ROUTER_API_KEYS='["user1:infer","boss:admin"]',
        AIMESH_ROUTER_MAX_CONCURRENCY="1",
    )
    worker = spawn("services.inference")
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    await deploy_digits(nc, names, timeout_s=30)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    split = {"model": "digits", "variants": [{"version": "1", "weight": 1}]}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v2/health/ready") as resp:
            assert resp.status == 200  # probes need no key
        async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
            assert resp.status == 401 and "API key is required" in (await resp.json())["error"]
        user = {"Authorization": "Bearer user1"}
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=user) as resp:
            assert resp.status == 200
        async with http.put(f"{base}/admin/splits/digits", json=split, headers={"X-API-Key": "user1"}) as resp:
            assert resp.status == 403
        async with http.put(f"{base}/admin/splits/digits", json=split, headers={"X-API-Key": "boss"}) as resp:
            assert resp.status == 200, await resp.text()
        late = {**user, "Aimesh-Timeout-Ms": "0.001"}
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=late) as resp:
            assert resp.status == 504, await resp.text()
        bad = {**user, "Aimesh-Timeout-Ms": "soon"}
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=bad) as resp:
            assert resp.status == 400

        # The bound (1 in flight): a request held by a stand-in worker of version 9 fills it.
        # Version 9 is deployed (a record, as `aimesh deploy` leaves it): the router routes only
        # to versions it knows are served.
        record = Deployment(model="digits", ref="9", version="9", updated_at="2026-01-01T00:00:00Z")
        await (await nc.jetstream().key_value(names.deployments_bucket)).put(
            "deploy.digits.9", msgspec.json.encode(record)
        )
        await eventually(lambda: _routes_to_9(http, base, body, user), 10, "the router to see digits@9 deployed")
        async with StandIn(nc, names.infer("digits", "9"), "9", hold=True) as held:

            async def held_request() -> tuple[int, str]:
                async with http.post(f"{base}/v2/models/digits/versions/9/infer", json=body, headers=user) as resp:
                    return resp.status, resp.headers.get("Aimesh-Variant", "")

            first = asyncio.create_task(held_request())
            await asyncio.wait_for(held.arrived.wait(), 10)  # in flight: it reached the worker
            async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=user) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1", await resp.text()
                assert "gateway busy (1 requests in flight, limit 1)" in (await resp.json())["error"]
            held.release.set()
            assert await first == (200, "9")
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=user) as resp:
            assert resp.status == 200  # the finished request gave its slot back


async def test_nats_programs_get_the_split_on_the_unversioned_subject(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    from shared.experiments import put_split
    from shared.schemas import Split, Variant

    await start_gateway(spawn, nats_url, names)
    for seed in (1, 2):
        await register_mlp(nc, names, seed=seed)
        await request(nc, names.deploy, DeployRequest(model="digits", ref=str(seed)), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "digits@1")
    await eventually(lambda: serving(nc, names, "digits@2"), 30, "digits@2")
    split = Split(
        model="digits", sticky="X-User", variants=[Variant(version="1", weight=1), Variant(version="2", weight=1)]
    )
    await put_split(nc.jetstream(), names, split)
    req = InferRequest(inputs={"x": to_wire(np.zeros((1, 64), dtype=np.float32))})

    async def routed(user: str) -> str:
        reply = await request(nc, names.infer_routed("digits"), req, InferReply, headers={"X-User": user})
        return reply.version

    async def split_seen() -> bool:
        return len({await routed(f"u{i}") for i in range(12)}) == 2

    await eventually(split_seen, 10, "the router to apply the split")
    first = {u: await routed(u) for u in ("ann", "ben", "cat", "dan")}
    assert first == {u: await routed(u) for u in first}  # sticky by the NATS header
    with pytest.raises(NotFound, match="is not deployed"):
        await request(nc, names.infer_routed("nothing"), req, InferReply)


async def test_deployments_are_followed_across_a_nats_restart(
    spawn: Callable[..., ServiceProcess], names: Names, tmp_path: Path
) -> None:
    import aiohttp
    import nats

    from shared.natsserver import NatsServer

    server = NatsServer(store_dir=tmp_path / "store", port=free_port(), http_port=None)
    server.start()
    try:
        worker = spawn("services.inference", url=server.url)
        router = spawn("services.router", url=server.url, AIMESH_ROUTER_PORT="0")
        await worker.wait_ready(server.url, names.micro_name("inference"), timeout_s=60)
        base = (await router.wait_ready(server.url, names.micro_name("router"))).metadata["http"]
        nc = await nats.connect(server.url)
        await deploy_digits(nc, names, timeout_s=30)
        await nc.close()

        server.stop()
        server.start()  # same port, same store: the KV watches of both services must carry on
        nc = await nats.connect(server.url)
        try:
            await register_mlp(nc, names, seed=2)

            async def deployed() -> Deployment | None:
                try:
                    return await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
                except (Unavailable, MeshTimeout):
                    return None  # the worker is still reconnecting

            assert (await eventually(deployed, 30, "the deploy endpoint")).version == "2"
            await eventually(lambda: serving(nc, names, "digits@2"), 30, "digits@2 after the restart")
            body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
            async with aiohttp.ClientSession() as http:

                async def routed_to_v2() -> bool:
                    async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
                        return resp.status == 200 and resp.headers.get("Aimesh-Variant") == "2"

                await eventually(routed_to_v2, 30, "the router to route to version 2")
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_a_version_whose_weights_do_not_load_is_not_served_and_says_why(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import aiohttp

    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_mlp(nc, names, seed=1)
    # Version 2's artifact holds the weights of another architecture (5 classes, the registry says 10).
    js = nc.jetstream()
    torch.manual_seed(2)
    await put_object(
        await artifacts(js, names),
        "models/digits/five.safetensors",
        weights_to_bytes(mlp(inputs=64, classes=5).state_dict()),
    )
    wrong = ModelVersion(
        model="digits",
        version="",
        artifact="models/digits/five.safetensors",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 64, "classes": 10},
        task="classify",
        dataset="digits@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[64])],
    )
    assert (await register(await js.key_value(names.registry_bucket), wrong)).version == "2"
    for ref in ("1", "2"):
        await request(nc, names.deploy, DeployRequest(model="digits", ref=ref), Deployment)

    async def failed() -> MicroPing | None:
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
        return next((p for p in pings if "digits@2" in p.metadata.get("failed", "")), None)

    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the worker to serve digits@1")
    ping = await eventually(failed, 30, "the worker to report that digits@2 failed to load")
    why = ping.metadata["failed"]
    assert why.startswith("digits@2: RuntimeError") and "size mismatch" in why, why
    assert ping.metadata["serving"] == "digits@1"
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v2/models/digits/versions/2/ready") as resp:
            assert resp.status == 503
        async with http.post(f"{base}/v2/models/digits/versions/2/infer", json=body) as resp:
            assert resp.status == 503 and "no inference worker serves digits@2" in (await resp.json())["error"]
        # The version that loaded is served beside it.
        async with http.get(f"{base}/v2/models/digits/versions/1/ready") as resp:
            assert resp.status == 200
        async with http.post(f"{base}/v2/models/digits/versions/1/infer", json=body) as resp:
            assert resp.status == 200
