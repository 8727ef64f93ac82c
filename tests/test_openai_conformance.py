"""The OpenAI-compatible API does what the official ``openai`` SDK expects, against a real router
and inference worker serving small language models: model retrieval, 404 ``model_not_found``,
``stream_options.include_usage``, chat completions (whole and streamed) through the chat template
the model declares, parameters refused by name, and a stream whose client goes away is cancelled
on its worker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import msgspec
import openai
import pytest
import torch
from nats.aio.client import Client as NatsClient

from services.inference.generate import pieces, prompt_ids
from services.router.openai import ChatMessage, ParamError, chat_request, decode_param, render_chat
from shared.client import request
from shared.names import Names
from shared.schemas import (
    ActorStats,
    ChatTemplate,
    Deployment,
    DeployRequest,
    GenerateRequest,
    ModelVersion,
    ServiceStatus,
    StatusRequest,
)
from tests.helpers import ServiceProcess, eventually
from tests.mesh import register_lm, register_mlp, serving, start_gateway
from zoo.lm import CHAT_TEMPLATE, causal_lm, declared_chat_template

SMALL = {"dim": 32, "layers": 1, "heads": 2, "context": 64}
SLOW = {"dim": 64, "layers": 2, "heads": 2, "context": 128}  # ~2 ms a token: 4096 take seconds
T = TypeVar("T")


async def deploy(nc: NatsClient, names: Names, *models: str) -> None:
    for model in models:
        await request(nc, names.deploy, DeployRequest(model=model), Deployment)
    want = [f"{model}@1" for model in models]

    async def all_served() -> bool:
        return all([await serving(nc, names, w) for w in want])

    await eventually(all_served, 60, f"the worker to serve {', '.join(want)}")


# -- pure pieces ------------------------------------------------------------------------------
def test_chat_template_is_data_substituted_by_replace_only() -> None:
    template = ChatTemplate(turn="<{role}>{content}</{role}>", generation_prompt="<assistant>", stop=["</"])
    messages = [ChatMessage(role="system", content="be {role} {0.__class__}"), ChatMessage(role="user", content="hi")]
    # Placeholders inside the content stay as written: nothing is formatted, no attribute is reached.
    assert render_chat(template, messages) == "<system>be {role} {0.__class__}</system><user>hi</user><assistant>"
    with pytest.raises(ParamError, match=r"messages\[0\].role 'tool' is not a role") as refused:
        render_chat(template, [ChatMessage(role="tool", content="x")])
    assert refused.value.param == "messages[0].role"
    with pytest.raises(ParamError, match=r"no \{content\}"):
        render_chat(ChatTemplate(turn="{role}", generation_prompt=""), messages)
    # The zoo's LMs declare a template (what the trainer registers); a non-template attribute is ignored.
    assert declared_chat_template(causal_lm(**SMALL)) == CHAT_TEMPLATE
    bogus = causal_lm(**SMALL)
    bogus.chat_template = "{content.__globals__}"  # type: ignore[assignment]
    assert declared_chat_template(bogus) is None
    version = ModelVersion(model="m", version="1", artifact="a", factory="f", task="lm", dataset="d")
    with pytest.raises(ParamError, match="declares no chat template"):
        chat_request(version, GenerateRequest(prompt=""), messages)
    assert decode_param("Object contains unknown field `name` - at `$.messages[0]`") == "messages[0].name"
    assert decode_param("Expected `int`, got `str` - at `$.n`") == "n"


def test_a_vanishing_top_p_keeps_the_likeliest_token() -> None:
    # 5e-324 is 0 in float32: no token would pass the cut, and sampling from all-zero weights fails.
    model = causal_lm(**SMALL).eval()
    greedy = list(model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=0))
    assert list(model.generate(torch.tensor([[1, 2, 3]]), 8, top_p=5e-324)) == greedy


def test_a_prompt_longer_than_the_context_is_cropped() -> None:
    assert prompt_ids("abcdef", 4) == list(b"cdef")
    model = causal_lm(**SMALL).eval()
    huge = "x" * (11 * 1024 * 1024)  # 11 MB: one context's work, not a crash
    t0 = time.perf_counter()
    out = list(pieces(model, GenerateRequest(prompt=huge, max_tokens=4, temperature=0)))
    assert out[-1].finish_reason in ("length", "stop") and time.perf_counter() - t0 < 10


# -- the API over a real mesh --------------------------------------------------------------------
async def streamed_with_usage(create: Callable[..., Awaitable[AsyncIterable[T]]], **kwargs: Any) -> list[T]:
    """Every event of ``create(**kwargs)`` streamed, with the usage asked for in a last event."""
    return [event async for event in await create(**kwargs, stream=True, stream_options={"include_usage": True})]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_openai_sdk_against_the_gateway(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names, "lm", SMALL, template=CHAT_TEMPLATE, no_eos=True)
    await register_lm(nc, names, "plain", SMALL, template=None, no_eos=True)
    await register_mlp(nc, names, seed=1)
    await deploy(nc, names, "lm", "plain", "digits")
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    async def listed() -> bool:
        return [m.id for m in (await client.models.list()).data] == ["lm", "plain"]

    await eventually(listed, 20, "the LMs to be listed")
    model = await client.models.retrieve("lm")
    assert model.id == "lm" and model.object == "model" and model.owned_by == "aimesh"
    for name in ("digits", "nothing"):  # a classifier, an unknown name
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve(name)
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model=name, prompt="x", max_tokens=2)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="not a language model"):
        await client.completions.create(model="digits", prompt="x")

    # Completions, whole and streamed with usage: the same greedy text.
    whole = await client.completions.create(model="lm", prompt="def main():", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len("def main():"), 12)
    events = await streamed_with_usage(
        client.completions.create, model="lm", prompt="def main():", max_tokens=12, temperature=0
    )
    assert "".join(e.choices[0].text for e in events[:-1]) == text
    assert all(e.usage is None for e in events[:-1]) and events[-1].choices == []
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 12
    assert events[-1].usage.total_tokens == 12 + len("def main():")

    # Chat: the prompt is the messages in the model's template, and its stop ends the turn.
    messages: list[Any] = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    rendered = "### system\nterse\n### user\nhi\n### assistant\n"
    same = await client.completions.create(model="lm", prompt=rendered, max_tokens=10, temperature=0, stop="\n### ")
    chat = await client.chat.completions.create(
        model="lm", messages=messages, max_completion_tokens=10, temperature=0, user="ada", seed=3
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == same.choices[0].text
    assert chat.choices[0].finish_reason == same.choices[0].finish_reason
    assert chat.usage is not None and chat.usage.prompt_tokens == len(rendered)
    chunks = await streamed_with_usage(
        client.chat.completions.create, model="lm", messages=messages, max_tokens=10, temperature=0
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == chat.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    with pytest.raises(openai.BadRequestError, match="declares no chat template"):
        await client.chat.completions.create(model="plain", messages=messages)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model="lm", prompt="x", logprobs=2)
    assert refused.value.param == "logprobs"
    await client.close()


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"50": 10}}, "logit_bias"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"temperature": 3}, "temperature"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"frobnicate": 1}, "frobnicate"),  # unknown to OpenAI too
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"n": 3}, "n"),
    ("/v1/chat/completions", {"max_completion_tokens": 5000}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"store": True}, "store"),
]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_unsupported_parameters_are_refused_by_name(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names, "lm", SMALL, template=CHAT_TEMPLATE, no_eos=True)
    await deploy(nc, names, "lm")
    defaults = {
        "/v1/completions": {"model": "lm", "prompt": "x", "max_tokens": 2},
        "/v1/chat/completions": {"model": "lm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    }
    async with aiohttp.ClientSession() as http:
        for path, body in defaults.items():  # the neutral values are accepted
            neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "user": "u"}
            async with http.post(f"{base}{path}", json=body | neutral) as ok:
                assert ok.status == 200, await ok.text()
        wrong = []
        for path, extra, param in REFUSED:
            async with http.post(f"{base}{path}", json=defaults[path] | extra) as response:
                got = await response.json()
                error = got.get("error", {})
                kind = error.get("type")
                if response.status != 400 or error.get("param") != param or kind != "invalid_request_error":
                    wrong.append(f"{path} {extra}: {response.status} {got}")
        assert not wrong, "\n".join(wrong)


def generation_stats(status: ServiceStatus, model: str) -> ActorStats:
    return next(a for a in status.actors if a.name == f"generate-{model}-1")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_stream_whose_client_leaves_is_cancelled_on_the_worker(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    _, _, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names, "long", SLOW, template=CHAT_TEMPLATE, no_eos=True)
    await deploy(nc, names, "long")

    async def stats() -> ActorStats:
        status = await request(nc, names.service_status("inference"), StatusRequest(), ServiceStatus)
        return generation_stats(status, "long")

    assert (await stats()).extra == {"generating": 0, "cancelled": 0}
    body = {"model": "long", "prompt": "x", "max_tokens": 4096, "temperature": 0, "stream": True}
    for path, payload in (
        ("/v1/completions", body),
        ("/v1/chat/completions", {**body, "prompt": None, "messages": [{"role": "user", "content": "x"}]}),
    ):
        payload = {k: v for k, v in payload.items() if v is not None}
        async with aiohttp.ClientSession() as http, http.post(f"{base}{path}", json=payload) as streaming:
            assert streaming.status == 200
            first = await streaming.content.readline()
            assert first.startswith(b"data: ") and msgspec.json.decode(first[6:])["choices"]
            assert (await stats()).extra["generating"] == 1
            t0 = time.monotonic()
        # The client is gone: 4096 tokens take several seconds; the worker stops within a token or so.

        async def stopped() -> ActorStats | None:
            s = await stats()
            return s if s.extra["generating"] == 0 and s.in_flight == 0 else None

        after = await eventually(stopped, 10, "the generation to stop")
        assert time.monotonic() - t0 < 2.0, "the generation ran on after its client left"
        assert after.extra["cancelled"] == (1 if path == "/v1/completions" else 2)

    # A stream read to its end is not cancelled; with include_usage every chunk says "usage": null
    # but the last, whose choices are empty.
    async with aiohttp.ClientSession() as http:
        short = {**body, "max_tokens": 5, "stream_options": {"include_usage": True}}
        async with http.post(f"{base}/v1/completions", json=short) as done:
            raw = await done.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [msgspec.json.decode(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
    assert all("usage" in e and e["usage"] is None and e["choices"] for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5

    async def idle() -> ActorStats | None:  # the worker may send [DONE] before it counts the stream done
        s = await stats()
        return s if s.extra["generating"] == 0 else None

    finished = await eventually(idle, 10, "the finished stream to stop generating")
    assert finished.extra == {"generating": 0, "cancelled": 2}


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_an_11_mb_prompt_is_cropped_not_a_crash(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, bus_max_payload: int
) -> None:
    huge = "def main():\n" * (11 * 1024 * 1024 // 12)  # 11 MB
    if bus_max_payload < len(huge) + 64 * 1024:
        pytest.skip(f"the bus carries {bus_max_payload} bytes, under an 11 MB prompt")
    worker, _, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names, "lm", SMALL, template=CHAT_TEMPLATE, no_eos=True)
    await deploy(nc, names, "lm")
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    big = await client.completions.create(model="lm", prompt=huge, max_tokens=4, temperature=0)
    # The model read the prompt's last context (64 tokens): the same text as that tail alone.
    tail = await client.completions.create(model="lm", prompt=huge[-SMALL["context"] :], max_tokens=4, temperature=0)
    assert big.choices[0].text == tail.choices[0].text and big.choices[0].finish_reason == "length"
    assert big.usage is not None and big.usage.prompt_tokens == len(huge)
    assert worker.proc.poll() is None  # still running
    await client.close()
