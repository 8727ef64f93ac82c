"""Token streaming from a served language model: over NATS, and through the OpenAI-compatible
HTTP API with the official openai client (plain and server-sent events)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.aio.client import Client as NatsClient

from shared.client import request, stream
from shared.errors import BadRequest
from shared.names import Names
from shared.schemas import (
    Deployment,
    DeployRequest,
    GenerateChunk,
    GenerateRequest,
)
from tests.helpers import ServiceProcess, eventually
from tests.mesh import register_lm, serving, start_gateway

pytestmark = pytest.mark.slow


async def generate(nc: NatsClient, names: Names, req: GenerateRequest) -> list[GenerateChunk]:
    return [c async for c in stream(nc, names.generate("lm", "1"), req, GenerateChunk, done=lambda c: c.done)]


async def test_tokens_stream_over_nats_and_the_openai_api(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    worker, router, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names)
    await request(nc, names.deploy, DeployRequest(model="lm"), Deployment)
    await eventually(lambda: serving(nc, names, "lm@1"), 30, "the worker to serve lm@1")

    greedy = GenerateRequest(prompt="def main():", max_tokens=24, temperature=0)
    chunks = await generate(nc, names, greedy)
    assert len(chunks) > 2 and chunks[-1].done and [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 24
    text = "".join(c.text for c in chunks)
    assert text == "".join(c.text for c in await generate(nc, names, greedy))  # greedy is deterministic

    # A stop sequence ends the text before it, and is not sent.
    stop = text[6:9]
    stopped = await generate(
        nc, names, GenerateRequest(prompt="def main():", max_tokens=24, temperature=0, stop=[stop])
    )
    assert "".join(c.text for c in stopped) == text[: text.index(stop)] and stopped[-1].finish_reason == "stop"
    with pytest.raises(BadRequest, match="max_tokens must be between 1 and 4096"):
        await generate(nc, names, GenerateRequest(prompt="x", max_tokens=0))

    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    async def listed() -> bool:
        return [m.id for m in (await client.models.list()).data] == ["lm"]

    await eventually(listed, 10, "the LM to be listed")
    completion = await client.completions.create(model="lm", prompt="def main():", max_tokens=24, temperature=0)
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 24
    streamed = await client.completions.create(
        model="lm", prompt="def main():", max_tokens=24, temperature=0, stream=True
    )
    parts = [event.choices[0].text async for event in streamed]
    assert "".join(parts) == text and len(parts) > 2
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'n'"):
        await client.completions.create(model="lm", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError, match="is not deployed"):
        await client.completions.create(model="nothing", prompt="x")
    await client.close()
    for proc in (router, worker):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_the_gateway_bounds_requests_in_flight(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    import aiohttp

    _, _, base = await start_gateway(spawn, nats_url, names, router_env={"AIMESH_ROUTER_MAX_CONCURRENCY": "1"})
    await register_lm(nc, names)
    await request(nc, names.deploy, DeployRequest(model="lm"), Deployment)
    await eventually(lambda: serving(nc, names, "lm@1"), 30, "the worker to serve lm@1")
    long = {"model": "lm", "prompt": "x", "max_tokens": 2000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/v1/completions", json=long) as streaming:
        assert streaming.status == 200
        await streaming.content.readline()  # the first event: the request is in flight
        async with http.post(f"{base}/v1/completions", json={**long, "stream": False}) as refused:
            assert refused.status == 429 and refused.headers["Retry-After"] == "1"
            assert "1 requests in flight, limit 1" in (await refused.json())["error"]["message"]
