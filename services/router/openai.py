"""OpenAI-compatible ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (with ``stream: true`` as server-sent events), so the official
``openai`` client works against the gateway.

Only what the models support is accepted, and nothing is silently ignored: a parameter the
models cannot honour (``logprobs``, ``n`` > 1, ``echo``, penalties, tools, …) or one OpenAI does
not define is a 400 naming it in ``param``; a ``model`` that is not a deployed language model is
a 404 ``model_not_found``.  Errors use OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``.

Chat messages become one prompt through the chat template the model version declares
(:class:`~shared.schemas.ChatTemplate`, plain data): ``{role}`` and ``{content}`` are substituted
with ``str.replace``, never ``str.format`` or a template engine.

The handlers are module-level functions of the request over the :class:`LanguageModels` that
:func:`add_routes` keeps in ``app[LANGUAGE_MODELS]``.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Protocol

import msgspec
from aiohttp import web

from services.router import edge
from shared.errors import BadRequest, MeshTimeout, NotFound, ServiceError
from shared.names import check_name
from shared.schemas import ChatTemplate, GenerateChunk, GenerateRequest, ModelVersion

# Integers the router encodes (MessagePack) are checked first: no client number overflows it.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
MAX_TOKENS = 4096  # what a worker generates at most (services.inference.generate.check)
MAX_STOP = 4  # OpenAI's limit on stop sequences
CHAT_MAX_TOKENS = 256  # a chat completion's default length (OpenAI's is "up to the context")


class ParamError(BadRequest):
    """A 400 about one request parameter, named in OpenAI's ``param``."""

    def __init__(self, description: str, param: str | None) -> None:
        super().__init__(description)
        self.param = param


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What both routes take; the fields after ``user`` are refused unless neutral."""

    model: str
    max_tokens: Int64 | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: Int64 | None = None  # an extension; OpenAI has none
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int64 = 1
    seed: Int64 | None = None
    user: str | None = None  # accepted (OpenAI's end-user id); aimesh records nothing with it
    logprobs: bool | Int64 | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class CompletionBody(Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str]
    best_of: Int64 | None = None
    echo: bool = False
    suffix: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str


class ChatBody(Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: Int64 | None = None
    top_logprobs: Int64 | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


_completion_body = msgspec.json.Decoder(CompletionBody)
_chat_body = msgspec.json.Decoder(ChatBody)
# "… unknown field `x` - at `$.messages[0]`", "… missing required field `x`", "… - at `$.n`"
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")
_PATH = re.compile(r"at `\$\.?([^`]*)`")


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


def model_not_found(model: str, why: str) -> web.Response:
    return openai_error(404, why or f"model {model!r} does not exist", code="model_not_found", param="model")


def decode_param(description: str) -> str | None:
    """The parameter a decoding error is about (``n``, ``messages[0].role``), from msgspec's text."""
    path = _PATH.search(description)
    field = _FIELD.search(description)
    parts = [p for p in (path.group(1) if path else "", field.group(1) if field else "") if p]
    return ".".join(parts) or None


def decode(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """The body, or a 400 naming the parameter that is unknown, missing or of the wrong type."""
    try:
        return edge.decode(decoder, raw, "request")
    except BadRequest as exc:
        if "unknown field" in exc.description:
            exc = BadRequest(f"{exc.description}: unsupported parameter (see /openapi.json for the ones accepted)")
        raise ParamError(exc.description, decode_param(exc.description)) from None


def refuse(param: str, why: str) -> ParamError:
    return ParamError(f"unsupported parameter {param!r}: {why}", param)


def check_sampling(body: Sampling) -> None:
    """Refuse what cannot be honoured, naming the parameter; check ranges before the mesh."""
    edge_check(body.model)
    check_supported(body)
    if not (math.isfinite(body.temperature) and 0 <= body.temperature <= 2):
        raise ParamError(f"temperature must be a finite number between 0 and 2 (got {body.temperature})", "temperature")
    if body.top_p is not None and not (math.isfinite(body.top_p) and 0 < body.top_p <= 1):
        raise ParamError(f"top_p must be in (0, 1] (got {body.top_p})", "top_p")
    if body.top_k is not None and body.top_k < 1:
        raise ParamError(f"top_k must be ≥ 1 (got {body.top_k})", "top_k")
    stop = stops(body.stop)
    if len(stop) > MAX_STOP or not all(stop):
        raise ParamError(f"stop: at most {MAX_STOP} non-empty sequences", "stop")


def check_supported(body: Sampling) -> None:
    """Parameters the API has and the mesh does not honour are refused, never silently ignored."""
    if body.n != 1:
        raise refuse("n", "one choice per request (n = 1)")
    if body.logprobs not in (None, False):
        raise refuse("logprobs", "log probabilities are not returned")
    if body.logit_bias:
        raise refuse("logit_bias", "token biases are not applied")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise refuse(name, "penalties are not applied (only 0 is accepted)")
    if body.stream_options is not None and not body.stream:
        raise ParamError("stream_options is only allowed when stream is true", "stream_options")


def edge_check(model: str) -> None:
    try:
        check_name(model, "model name")  # before it names a subject
    except BadRequest as exc:
        raise ParamError(exc.description, "model") from None


def check_max_tokens(value: int | None, param: str) -> None:
    if value is not None and not 1 <= value <= MAX_TOKENS:
        raise ParamError(f"{param} must be between 1 and {MAX_TOKENS} (got {value})", param)


def stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def check_completion(body: CompletionBody) -> str:
    """The one prompt of a valid completion request."""
    check_sampling(body)
    check_max_tokens(body.max_tokens, "max_tokens")
    if body.best_of not in (None, 1):
        raise refuse("best_of", "one completion is generated (best_of = 1)")
    if body.echo:
        raise refuse("echo", "the prompt is not echoed")
    if body.suffix:
        raise refuse("suffix", "insertion after a suffix is not supported")
    prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
    if prompt is None:
        raise ParamError("one prompt string is supported (a list of exactly one is accepted)", "prompt")
    if not prompt:
        raise ParamError("the prompt is empty", "prompt")
    return prompt


def check_chat(body: ChatBody) -> None:
    check_sampling(body)
    check_max_tokens(body.max_tokens, "max_tokens")
    check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    if body.top_logprobs not in (None, 0):
        raise refuse("top_logprobs", "log probabilities are not returned")
    if body.response_format is not None and body.response_format.type != "text":
        raise refuse("response_format", f"only text is generated, not {body.response_format.type!r}")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise refuse(name, "the models do not call tools")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise refuse(name, "the models do not call tools")
    if not body.messages:
        raise ParamError("messages must hold at least one message", "messages")


def chat_request(version: ModelVersion, req: GenerateRequest, messages: list[ChatMessage]) -> GenerateRequest:
    """``req`` with its prompt rendered from ``messages`` by the version's chat template (a 400
    when it declares none, or when a message's role is not one of its roles)."""
    template = version.chat_template
    if template is None:
        raise ParamError(
            f"model {version.model!r} (version {version.version}) declares no chat template, so it cannot "
            "take chat messages: use /v1/completions with a prompt",
            "model",
        )
    prompt = render_chat(template, messages)
    return msgspec.structs.replace(req, prompt=prompt, stop=[*req.stop, *template.stop])


def render_chat(template: ChatTemplate, messages: list[ChatMessage]) -> str:
    if "{content}" not in template.turn:  # the model's mistake, but never drop what was sent
        raise ParamError("this model's chat template has no {content} in its turn: it cannot take messages", "model")
    parts = []
    for i, message in enumerate(messages):
        if message.role not in template.roles:
            raise ParamError(
                f"messages[{i}].role {message.role!r} is not a role of this model's chat template "
                f"(roles: {', '.join(template.roles)})",
                f"messages[{i}].role",
            )
        # The content goes in last, so nothing in it is ever read as a placeholder.
        parts.append(template.turn.replace("{role}", message.role).replace("{content}", message.content))
    return "".join(parts) + template.generation_prompt


class Shape:
    """How one route writes a completion: its objects and its choices, whole or in chunks."""

    def __init__(self, kind: Literal["text", "chat"], model: str, request_id: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self.started = False

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, last: GenerateChunk) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
            out = self.envelope("chat.completion", [choice])
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}
            out = self.envelope("text_completion", [choice])
        return out | {"usage": usage(last)}

    def events(self, chunk: GenerateChunk) -> list[bytes]:
        """The server-sent events for one chunk from the mesh."""
        finish = chunk.finish_reason if chunk.done else None
        if self.kind == "text":
            return [self.event([{"text": chunk.text, "index": 0, "logprobs": None, "finish_reason": finish}])]
        out = []
        if not self.started:  # OpenAI's first chunk carries the role
            out.append(self.event([delta({"role": "assistant", "content": ""})]))
            self.started = True
        if chunk.text:
            out.append(self.event([delta({"content": chunk.text})]))
        if chunk.done:
            out.append(self.event([delta({}, finish)]))
        return out

    def event(self, choices: list[dict[str, Any]], used: dict[str, int] | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self.envelope(obj, choices)
        if self.include_usage:  # null on every chunk but the last, as OpenAI does
            body["usage"] = used
        return sse(body)

    def usage_event(self, last: GenerateChunk) -> bytes:
        return self.event([], usage(last))


def delta(content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}


def usage(last: GenerateChunk) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


def sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class LanguageModels(Protocol):
    """The OpenAI side of the gateway: which language models are deployed, and a completion
    from one of them (404 for a model that is not a deployed language model; with ``chat``, the
    prompt is the messages in the model's chat template)."""

    def lm_models(self) -> list[str]: ...

    def generate(
        self, model: str, req: GenerateRequest, chat: list[ChatMessage] | None = None
    ) -> AsyncIterator[GenerateChunk]: ...


LANGUAGE_MODELS = web.AppKey[LanguageModels]("language_models")


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "aimesh"}


async def list_models(request: web.Request) -> web.Response:
    models = request.app[LANGUAGE_MODELS].lm_models()
    return web.json_response({"object": "list", "data": [model_object(m) for m in sorted(models)]})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in request.app[LANGUAGE_MODELS].lm_models():
        return model_not_found(name, f"model {name!r} is not a deployed language model (GET /v1/models lists them)")
    return web.json_response(model_object(name))


async def completions(request: web.Request) -> web.StreamResponse:
    try:
        body = decode(_completion_body, await request.read())
        prompt = check_completion(body)
    except ParamError as exc:
        return openai_error(400, exc.description, param=exc.param)
    req = sampling_request(body, prompt, body.max_tokens or 16)
    shape = Shape("text", body.model, req.id, include(body))
    return await respond(request, body, request.app[LANGUAGE_MODELS].generate(body.model, req), shape)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = decode(_chat_body, await request.read())
        check_chat(body)
    except ParamError as exc:
        return openai_error(400, exc.description, param=exc.param)
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    req = sampling_request(body, "", max_tokens)
    chunks = request.app[LANGUAGE_MODELS].generate(body.model, req, chat=body.messages)
    return await respond(request, body, chunks, Shape("chat", body.model, req.id, include(body)))


def add_routes(app: web.Application, lm: LanguageModels) -> None:
    """The OpenAI routes on ``app``, over ``lm`` (kept in ``app[LANGUAGE_MODELS]``)."""
    app[LANGUAGE_MODELS] = lm
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)


def include(body: Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def sampling_request(body: Sampling, prompt: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=stops(body.stop),
        seed=body.seed,
        id=edge.new_request_id(),  # names the generation (its cancel subject) and the completion
    )


async def respond(
    request: web.Request, body: Sampling, chunks: AsyncIterator[GenerateChunk], shape: Shape
) -> web.StreamResponse:
    """Generate, then answer whole or as server-sent events.  Closing ``chunks`` early (the
    client went away) makes the router cancel the generation on its worker."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        if not body.stream:
            try:
                text, last = "", None
                async for chunk in chunks:
                    text += chunk.text
                    last = chunk
            except (ServiceError, MeshTimeout) as exc:
                return error_response(exc)
            assert last is not None
            return web.json_response(shape.whole(text, last))
        return await stream_events(request, chunks, shape)


async def stream_events(request: web.Request, chunks: AsyncIterator[GenerateChunk], shape: Shape) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    last: GenerateChunk | None = None
    try:
        async for chunk in chunks:
            if response is None:  # errors before the first chunk are still plain HTTP errors
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
            for event in shape.events(chunk):
                await response.write(event)
            last = chunk
        assert response is not None and last is not None
        if shape.include_usage:
            await response.write(shape.usage_event(last))
    except (ServiceError, MeshTimeout) as exc:
        if response is None:
            return error_response(exc)
        await response.write(sse({"error": error_body(exc)}))
    except ConnectionError:  # the client went away: the generation is cancelled as chunks close
        assert response is not None
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def error_body(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, NotFound):
        return {
            "message": exc.description,
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    if isinstance(exc, ServiceError):
        kind = "invalid_request_error" if exc.code < 500 else "server_error"
        return {"message": exc.description, "type": kind, "param": getattr(exc, "param", None), "code": None}
    return {"message": str(exc), "type": "timeout", "param": None, "code": None}


def error_response(exc: Exception) -> web.Response:
    status = exc.code if isinstance(exc, ServiceError) else 504
    return web.json_response({"error": error_body(exc)}, status=status)


__all__ = ["BadRequest", "ChatMessage", "LanguageModels", "add_routes", "chat_request", "openai_error"]
