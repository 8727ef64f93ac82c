"""Large bodies end to end: every body the router accepts travels over the bus and is served; what
is over a limit is a 413 naming the size and the limit, at once, never a timeout or a dropped
connection.  Real router, real inference worker, real models, on the session's nats-server
(whose max_payload is what ``aimesh up`` gives its embedded server: 32 MiB).  See
docs/serving.md, "Size limits, end to end"."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aimesh.supervisor import Supervisor
from shared import durable
from shared.actor import Actor, ActorConfig, Call
from shared.client import request, stream
from shared.config import DEFAULT_NATS_MAX_PAYLOAD, DurableConfig, RouterConfig, UpConfig, load_up_config
from shared.errors import ConfigError, PayloadTooLarge
from shared.names import Names
from shared.natsserver import NatsServer
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    ColumnSpec,
    Deployment,
    DeployRequest,
    DurableResult,
    GenerateChunk,
    InferReply,
    InferRequest,
    ModelVersion,
)
from shared.tensors import from_wire, to_wire
from tests.helpers import ServiceProcess, eventually
from tests.mesh import register_lm, register_mlp, serving, start_gateway
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp

KIB, MIB = 1024, 1024 * 1024
MAX_BODY = RouterConfig().max_body_bytes  # the router's default limit: 16 MiB
ROW = 64 * 4  # one digits row of FP32
WIDE = 65536  # classes of the model whose output outgrows its input


@pytest.fixture
def big_bus(bus_max_payload: int) -> int:
    """The bus limit, when it carries a body of the router's default limit."""
    if bus_max_payload < MAX_BODY + 64 * KIB:
        pytest.skip(
            f"the NATS server's max_payload is {bus_max_payload} bytes: these tests need one over "
            f"{MAX_BODY} (the embedded server's 32 MiB; a Docker or $NATS_URL server keeps NATS's 1 MiB)"
        )
    return bus_max_payload


def binary_body(x: np.ndarray, size: int | None = None) -> tuple[bytes, int]:
    """An OIP binary body for ``x`` asking for binary logits, its JSON header padded with spaces
    to make the body exactly ``size`` bytes; returns (body, header length)."""
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    if size is not None:
        assert size >= len(header) + x.nbytes, size
        header += b" " * (size - len(header) - x.nbytes)
    return header + x.tobytes(), len(header)


def rows_for(size: int) -> np.ndarray:
    """Digits rows whose binary body (with its ~200-byte header) is about ``size`` bytes."""
    return np.random.default_rng(size).random(((size - 512) // ROW, 64), dtype=np.float32)


async def post_binary(http: aiohttp.ClientSession, base: str, body: bytes, header_length: int) -> tuple[int, bytes]:
    """POST a binary body; (status, the logits' bytes on a 200, else the body)."""
    headers = {"Inference-Header-Content-Length": str(header_length)}
    # A stream, not bytes: aiohttp warns that sending megabytes of bytes at once holds the loop.
    async with http.post(f"{base}/v2/models/digits/infer", data=io.BytesIO(body), headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            return resp.status, raw
        length = int(resp.headers["Inference-Header-Content-Length"])
        assert [o["name"] for o in json.loads(raw[:length])["outputs"]] == ["logits"]
        return 200, raw[length:]


@pytest.mark.slow
async def test_bodies_up_to_the_router_limit_are_served(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, big_bus: int
) -> None:
    worker, router, base = await start_gateway(spawn, nats_url, names)
    _, model = await register_mlp(nc, names, seed=7)
    await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 30, "the worker to serve digits@1")
    assert f"bus messages up to {big_bus} bytes" in router.output()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # Binary FP32: 1 KiB, 900 KiB (under NATS's default 1 MiB), 2 MiB (over it) and exactly
        # the router's limit (16 MiB: 65,534 rows).
        for size in (KIB, 900 * KIB, 2 * MIB, MAX_BODY):
            x = rows_for(size)
            body, header_length = binary_body(x, size)
            assert len(body) == size
            status, raw = await post_binary(http, base, body, header_length)
            assert status == 200, (size, raw[:300])
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
            got = np.frombuffer(raw, dtype=np.float32).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        # One byte over the router's limit: 413 in JSON, naming the limit.
        x = rows_for(MAX_BODY)
        body, header_length = binary_body(x, MAX_BODY + 1)
        status, raw = await post_binary(http, base, body, header_length)
        assert status == 413 and f"over the limit of {MAX_BODY} bytes" in json.loads(raw)["error"], raw[:300]

        # JSON over 1 MiB (numbers as text: 3,000 rows are about 4 MB of JSON, 750 KB on the bus).
        x = rows_for(3000 * ROW)
        payload = json.dumps(
            {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        assert len(payload) > MIB
        async with http.post(
            f"{base}/v2/models/digits/infer", data=io.BytesIO(payload), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            out = await resp.json()
        logits = next(o for o in out["outputs"] if o["name"] == "logits")
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.array(logits["data"]).reshape(logits["shape"]), expected, rtol=1e-5, atol=1e-6)

        # Durable, over NATS's default 1 MiB: through the requests and results streams.
        x = rows_for(2 * MIB)
        body, header_length = binary_body(x)
        async with http.post(
            f"{base}/v2/models/digits/infer",
            data=io.BytesIO(body),
            headers={"Inference-Header-Content-Length": str(header_length), "Prefer": "respond-async"},
        ) as resp:
            assert resp.status == 202, await resp.text()
            location = resp.headers["Location"]

        async def answered() -> dict[str, object] | None:
            async with http.get(f"{base}{location}") as resp:
                return await resp.json() if resp.status == 200 else None

        done = await eventually(answered, 30, "the durable result")
        logits = next(o for o in done["outputs"] if o["name"] == "logits")  # type: ignore[attr-defined]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.array(logits["data"]).reshape(logits["shape"]), expected, rtol=1e-5, atol=1e-6)
    assert "Traceback" not in router.output() + worker.output()
    for proc in (router, worker):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_a_message_over_the_bus_limit_is_413_before_it_is_sent(nc: NatsClient, names: Names) -> None:
    limit = nc.max_payload
    for size in (limit + 1, limit - 8):  # the second fits nats-py's check, not the server's: headers count
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge) as caught:
            await request(nc, names.infer("digits", "1"), b"x" * size, bytes, timeout_s=10)
        assert time.monotonic() - started < 1  # at once, not at the timeout
        assert caught.value.code == 413
        assert f"over the bus's max_payload of {limit} bytes" in caught.value.description
        assert f"the request to {names.infer('digits', '1')} is " in caught.value.description

    with pytest.raises(PayloadTooLarge, match="max_payload"):
        async for _ in stream(nc, names.generate("lm", "1"), b"x" * limit, GenerateChunk, done=lambda c: c.done):
            pass

    # A durable request too: refused before anything is stored.
    deployed = [Deployment(model="digits", ref="latest", version="1")]
    req = InferRequest(inputs={"x": to_wire(np.zeros(limit // 4, dtype=np.float32))}, id="big")
    with pytest.raises(PayloadTooLarge, match=r"the durable request 'big' for digits@1 is \d+ bytes encoded"):
        await durable.submit(nc.jetstream(), names, "digits", "1", req, deployments=deployed)

    # The connection was never closed by the server for a payload violation.
    assert nc.is_connected
    await nc.flush(timeout=5)


async def test_aimesh_up_gives_its_server_nats_max_payload(tmp_path: Path) -> None:
    """The supervisor's config file raises the server's limit (nats-server has no flag for it),
    and clients read it from the server at connect."""
    assert UpConfig().nats_max_payload == DEFAULT_NATS_MAX_PAYLOAD == 32 * MIB
    up = UpConfig(data_dir=str(tmp_path / "mesh"), auth=False, nats_max_payload=5 * MIB)
    supervisor = Supervisor(up, nats_url=None, child_env={}, drain_timeout_s=1.0)
    (tmp_path / "mesh").mkdir()
    args = supervisor._server_config_args()
    assert "max_payload: 5242880" in (tmp_path / "mesh" / "nats-server.conf").read_text()
    with NatsServer(store_dir=tmp_path / "store", http_port=None, extra_args=args) as server:
        client = await nats.connect(server.url)
        try:
            assert client.max_payload == 5 * MIB

            async def echo(msg: Msg) -> None:
                await msg.respond(msg.data)

            sub = await client.subscribe("echo", cb=echo)
            reply = await client.request("echo", b"x" * (4 * MIB), timeout=10)  # NATS's own limit is 1 MiB
            assert len(reply.data) == 4 * MIB
            await sub.unsubscribe()
        finally:
            await client.close()

    with pytest.raises(ConfigError, match=r"AIMESH_UP_NATS_MAX_PAYLOAD: Expected `int` <= 67108864"):
        load_up_config(env={"AIMESH_UP_NATS_MAX_PAYLOAD": str(65 * MIB)})


async def test_durable_streams_refuse_what_they_cannot_hold_with_413(nc: NatsClient, names: Names) -> None:
    """A request over the requests stream's size is a 413 naming the setting, not a 429 "full";
    a result over the results stream's size is stored as a 413 error, not accepted and dropped."""
    js = nc.jetstream()
    # Under any bus's limit (NATS's own is 1 MiB), over the streams'.
    small = DurableConfig(requests_max_bytes=256 * KIB, results_max_bytes=256 * KIB)
    for config in durable.stream_configs(names, small):
        assert config.max_msg_size == 256 * KIB
        await js.add_stream(config)
    assert durable.largest_message(DurableConfig().requests_max_bytes) == 64 * MIB  # any message the bus carries

    deployed = [Deployment(model="digits", ref="latest", version="1")]
    req = InferRequest(inputs={"x": to_wire(np.zeros(512 * KIB // 4, dtype=np.float32))}, id="half-mib")
    with pytest.raises(PayloadTooLarge, match=r"stream \S+_REQUESTS holds of 262144 bytes: .* requests_max_bytes"):
        await durable.submit(js, names, "digits", "1", req, deployments=deployed)
    assert (await js.stream_info(names.requests_stream)).state.messages == 0

    result = DurableResult(id="half-mib", state="done", model="digits", version="1", outputs=req.inputs)
    await durable.store_result(js, names, result)
    stored = await durable.fetch(js, names, "half-mib")
    assert stored.state == "error" and stored.code == 413 and not stored.outputs, stored
    assert "results_max_bytes" in stored.error


async def test_an_actor_whose_reply_is_over_the_bus_limit_answers_413(nc: NatsClient, names: Names) -> None:
    limit = nc.max_payload

    async def handler(size: int, _: Call) -> bytes:
        return b"x" * size

    actor: Actor[int] = Actor(nc, ActorConfig(name="big", subject=f"{names.prefix}.big"), handler, int)
    await actor.start()
    try:
        assert len(await request(nc, actor.subject, 1000, bytes)) == 1000
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge) as caught:
            await request(nc, actor.subject, limit + 1, bytes, timeout_s=10)
        assert time.monotonic() - started < 2  # the error reply, not the timeout
        assert caught.value.description.startswith(f"big: the output is {limit + 1} bytes encoded")
        assert (actor.errors, actor.last_error[:3]) == (1, "413")
        assert len(await request(nc, actor.subject, limit, bytes)) == limit  # exactly the limit travels
    finally:
        await actor.stop_intake()


async def register_wide(nc: NatsClient, names: Names) -> torch.nn.Module:
    """A linear model from 1 input to WIDE logits: 4 input bytes a row, 256 KiB of output a row."""
    torch.manual_seed(0)
    model = mlp(inputs=1, classes=WIDE, hidden=[]).eval()
    js = nc.jetstream()
    await put_object(await artifacts(js, names), "models/wide/1.safetensors", weights_to_bytes(model.state_dict()))
    version = ModelVersion(
        model="wide",
        version="",
        artifact="models/wide/1.safetensors",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 1, "classes": WIDE, "hidden": []},
        task="classify",
        dataset="wide@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[1])],
    )
    await register(await js.key_value(names.registry_bucket), version)
    return model


@pytest.mark.slow
async def test_an_output_over_the_bus_limit_is_a_413_reply_not_a_timeout(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, bus_max_payload: int
) -> None:
    worker, router, base = await start_gateway(spawn, nats_url, names)
    await register_wide(nc, names)
    await request(nc, names.deploy, DeployRequest(model="wide"), Deployment)
    await eventually(lambda: serving(nc, names, "wide@1"), 30, "the worker to serve wide@1")
    subject = names.infer("wide", "1")

    small = np.ones((2, 1), dtype=np.float32)
    reply = await request(nc, subject, InferRequest(inputs={"x": to_wire(small)}), InferReply, timeout_s=30)
    assert from_wire(reply.outputs["logits"]).shape == (2, WIDE)

    rows = bus_max_payload // (WIDE * 4) + 1  # a few hundred input bytes, over max_payload of output
    x = np.ones((rows, 1), dtype=np.float32)
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge) as caught:
        await request(nc, subject, InferRequest(inputs={"x": to_wire(x)}), InferReply, timeout_s=30)
    assert time.monotonic() - started < 10  # the error reply, long before the timeout
    assert caught.value.code == 413
    assert "the output is " in caught.value.description
    assert f"over the bus's max_payload of {bus_max_payload} bytes" in caught.value.description

    # Through the gateway: a 413 in JSON.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        body = {"inputs": [{"name": "x", "shape": [rows, 1], "datatype": "FP32", "data": x.ravel().tolist()}]}
        async with http.post(f"{base}/v2/models/wide/infer", json=body) as resp:
            assert resp.status == 413, await resp.text()
            assert "over the bus's max_payload" in (await resp.json())["error"]

    # Durable: the result is an error result with code 413, not a request pending forever.
    rid = await durable.submit(nc.jetstream(), names, "wide", "1", InferRequest(inputs={"x": to_wire(x)}, id="wide-1"))

    async def settled() -> bool:
        return (await durable.fetch(nc.jetstream(), names, rid)).state != "pending"

    await eventually(settled, 30, "the durable result")
    result = await durable.fetch(nc.jetstream(), names, rid)
    assert result.state == "error" and result.code == 413, result
    assert "the output of durable request 'wide-1' is " in result.error

    # The worker still serves.
    reply = await request(nc, subject, InferRequest(inputs={"x": to_wire(small)}), InferReply, timeout_s=30)
    assert reply.version == "1"
    assert "Traceback" not in worker.output()
    for proc in (router, worker):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0


@pytest.mark.slow
async def test_an_11_mb_prompt_to_completions_is_answered(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, big_bus: int
) -> None:
    worker, router, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names)
    await request(nc, names.deploy, DeployRequest(model="lm"), Deployment)
    await eventually(lambda: serving(nc, names, "lm@1"), 30, "the worker to serve lm@1")
    prompt = "def main():\n    pass\n" * (11_000_000 // 21)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        body = json.dumps({"model": "lm", "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
        assert len(body) > 11_000_000
        headers = {"Content-Type": "application/json"}
        async with http.post(f"{base}/v1/completions", data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 200, (await resp.text())[:500]
            out = await resp.json()
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert "Traceback" not in router.output() + worker.output()


@pytest.mark.slow
async def test_the_router_warns_when_its_body_limit_is_over_the_bus_limit(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, bus_max_payload: int
) -> None:
    router = spawn("services.router", AIMESH_ROUTER_PORT="0", AIMESH_ROUTER_MAX_BODY_BYTES=str(bus_max_payload))
    await router.wait_ready(nats_url, names.micro_name("router"))
    out = router.output()
    assert f"HTTP bodies up to {bus_max_payload} bytes" in out and f"bus messages up to {bus_max_payload}" in out
    assert out.count(f"[router] max_body_bytes ({bus_max_payload}) is over what the bus carries") == 1
