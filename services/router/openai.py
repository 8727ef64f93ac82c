"""OpenAI-compatible ``GET /v1/models`` and ``POST /v1/completions`` (with ``stream: true`` as
server-sent events), so the official ``openai`` client works against the gateway.

Only what the models support is accepted: one prompt string, ``n`` = 1; anything else is a 400
in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from services.router import edge
from shared.errors import BadRequest, MeshTimeout, ServiceError
from shared.schemas import GenerateChunk, GenerateRequest

Generate = Callable[[str, GenerateRequest], AsyncIterator[GenerateChunk]]
# Integers the router encodes (MessagePack) are checked first: no client number overflows it.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class CompletionBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | list[str]
    max_tokens: Int64 = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: Int64 | None = None  # an extension; OpenAI has none
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    seed: Int64 | None = None
    user: str | None = None


_body = msgspec.json.Decoder(CompletionBody)


def openai_error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    *,
    param: str | None = None,
) -> web.Response:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


def add_routes(app: web.Application, models: Callable[[], list[str]], generate: Generate) -> None:
    async def list_models(_: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "aimesh"} for m in sorted(models())]
        return web.json_response({"object": "list", "data": data})

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = edge.decode(_body, await request.read(), "request")
        except BadRequest as exc:
            return openai_error(400, exc.description)
        try:
            edge.check_name(body.model, "model name")  # before it names a subject
        except BadRequest as exc:
            return openai_error(400, exc.description, param="model")
        prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
        if prompt is None or body.n != 1:
            return openai_error(400, "one prompt string and n = 1 are supported")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        req = GenerateRequest(
            prompt=prompt,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=stop,
            seed=body.seed,
        )
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        chunks = generate(body.model, req)
        if not body.stream:
            try:
                text, last = "", None
                async for chunk in chunks:
                    text += chunk.text
                    last = chunk
            except (ServiceError, MeshTimeout) as exc:
                return _error_response(exc)
            assert last is not None
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}],
                    "usage": {
                        "prompt_tokens": last.prompt_tokens,
                        "completion_tokens": last.completion_tokens,
                        "total_tokens": last.prompt_tokens + last.completion_tokens,
                    },
                }
            )
        response: web.StreamResponse | None = None
        try:
            async for chunk in chunks:
                if response is None:  # errors before the first chunk are still plain HTTP errors
                    response = web.StreamResponse(
                        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                    )
                    await response.prepare(request)
                event = {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {
                            "text": chunk.text,
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": chunk.finish_reason if chunk.done else None,
                        }
                    ],
                }
                await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
        except (ServiceError, MeshTimeout) as exc:
            if response is None:
                return _error_response(exc)
            await response.write(b"data: " + msgspec.json.encode({"error": {"message": str(exc)}}) + b"\n\n")
        assert response is not None
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)


def _error_response(exc: Exception) -> web.Response:
    if isinstance(exc, ServiceError):
        kind = "invalid_request_error" if exc.code < 500 else "server_error"
        return openai_error(exc.code, exc.description, kind)
    return openai_error(504, str(exc), "timeout")


__all__ = ["BadRequest", "add_routes"]
