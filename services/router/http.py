"""The gateway's HTTP routes (aiohttp): Open Inference Protocol v2.

Handlers ask a :class:`Gateway` for state and inference; they never touch NATS directly.
Errors are ``{"error": "..."}`` with the status a :class:`ServiceError` carries (400, 404, 429
with ``Retry-After``, 503, 504), or 401 / 403 from the API keys (:mod:`shared.apikeys`: kept as
digests, compared in constant time; every route under ``/admin/`` needs the admin scope).
Client input is checked at the edge (:mod:`services.router.edge`: every path parameter is a
subject token before a handler runs), and aiohttp's own 404 / 405 are JSON too, so no client
input reaches a 5xx.

The handlers are module-level functions of the request: they read the :class:`Gateway` and the
:class:`HttpConfig` from the application (``request.app[GATEWAY]``, ``request.app[CONFIG]``),
which :func:`build_app` fills, so each can be served over any gateway (a test's fake included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np
from aiohttp import web

from services.router import edge, oip, openapi
from services.router.openai import openai_error
from shared import durable, tracing
from shared.apikeys import KeyRing, presented_key
from shared.errors import MeshTimeout, Overloaded, ServiceError, Unavailable
from shared.httpserve import BODY_TIMEOUT_S, BodyTimeout, read_body, timed_out
from shared.names import Header, check_name
from shared.schemas import DurableResult, Feedback, Split
from shared.tensors import from_wire

SERVER_NAME = "aimesh"
VARIANT = Header.VARIANT  # which version served the request
REQUEST_ID = Header.REQUEST_ID  # the id feedback names (also the OIP response's "id")
LABEL = "label"  # a classifier's class names (BYTES): returned only when asked for by name
_split = msgspec.json.Decoder(Split)
_feedback = msgspec.json.Decoder(Feedback)


class Gateway(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def is_ready(self) -> bool: ...

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]: ...

    async def set_split(self, split: Split) -> Split: ...

    async def submit_durable(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, str]: ...

    async def durable_result(self, request_id: str) -> DurableResult: ...

    def get_split(self, model: str) -> Split | None: ...

    async def delete_split(self, model: str) -> None: ...

    async def model_metadata(self, model: str, version: str | None) -> dict[str, Any]: ...

    async def model_ready(self, model: str, version: str | None) -> bool: ...

    async def class_names(self, model: str, version: str) -> list[str]: ...

    async def feedback(self, fb: Feedback, idempotency_key: str | None) -> None: ...


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def is_openai(path: str) -> bool:
    """Whether a path is in OpenAI's family (its error object), not aimesh's ``{"error"}``."""
    return path.startswith("/v1/") and not path.startswith("/v1/feedback")


def family_error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the convention of the request's path family: OpenAI's error object (with
    ``type`` and ``code``) under ``/v1/`` (except aimesh's own ``/v1/feedback``), else OIP's
    ``{"error": ...}``."""
    if not is_openai(request.path):
        return error(status, message, headers)
    kind, code = OPENAI_KINDS.get(status, ("invalid_request_error", None))
    response = openai_error(status, message, kind, code)
    response.headers.update(headers or {})
    return response


# OpenAI's (type, code) for the statuses the gate itself answers.
OPENAI_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "insufficient_scope"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", None),
    504: ("timeout", None),
}


def route_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 404 / 405 (no route, or not this method) as JSON in the path family's
    convention."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        headers = {"Allow": allowed}
    elif isinstance(exc, web.HTTPNotFound):
        message, headers = f"no route {request.method} {request.path}: see /openapi.json", {}
    else:
        message, headers = exc.reason, {}
    return family_error(request, exc.status, message, headers)


def gate_error(request: web.Request, exc: ServiceError | MeshTimeout) -> web.Response:
    """An error a handler raised, in the path family's convention (as :func:`from_exception`
    says it for OIP routes)."""
    if not is_openai(request.path):
        return from_exception(exc)
    if isinstance(exc, ServiceError):
        return family_error(request, exc.code, exc.description, retry_after(exc))
    return family_error(request, 504, str(exc))


def retry_after(exc: ServiceError) -> dict[str, str]:
    """``Retry-After`` for an error that says when to come back (429, a 503 with a hint)."""
    seconds = exc.retry_after_s if isinstance(exc, Overloaded | Unavailable) else None
    return {"Retry-After": str(max(1, round(seconds)))} if seconds is not None else {}


def from_exception(exc: Exception) -> web.Response:
    if isinstance(exc, ServiceError):
        return error(exc.code, exc.description, retry_after(exc))
    if isinstance(exc, MeshTimeout):
        return error(504, str(exc))
    raise exc


# Routes that need no key (by route template): health probes and the API's description.
OPEN_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready", "/openapi.json"})
ADMIN_PREFIX = "/admin/"
SCOPES = ("infer", "admin")  # admin may also infer
TIMEOUT_HEADER = Header.TIMEOUT_MS


def parse_keys(entries: list[str]) -> KeyRing:
    """``["k1:admin", "sha256:<hex>:infer"]`` → the router's key ring (``ValueError`` if malformed)."""
    return KeyRing.parse(entries, SCOPES)


def needs_scope(request: web.Request) -> str | None:
    """The scope a request needs: None for the open routes, ``admin`` for every route under
    ``/admin/`` (whatever the method), else ``infer``.  Decided by the route aiohttp matched,
    and by the path too, so no spelling of a path reaches an admin handler with less."""
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else None
    if (template is not None and template.startswith(ADMIN_PREFIX)) or request.path.startswith(ADMIN_PREFIX):
        return "admin"
    if template in OPEN_ROUTES:
        return None
    return "infer"


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """The gateway's HTTP limits: body size, a request's deadline (capped: a caller may ask for
    less with ``Aimesh-Timeout-Ms``), requests in flight, the body's arrival, and the API keys
    (None: every route is open)."""

    max_body_bytes: int
    timeout_s: float = 30.0
    max_concurrency: int = 1024
    body_timeout_s: float = BODY_TIMEOUT_S
    api_keys: KeyRing | None = None


class Gate:
    """What the :func:`gate` middleware keeps between requests: its limits, whether spans are
    recorded, and the requests in flight (one event loop: a plain counter)."""

    def __init__(self, config: HttpConfig, *, traced: bool) -> None:
        self.config = config
        self.traced = traced
        self.in_flight = 0


# What the handlers read from their application (aiohttp's typed keys).
GATEWAY = web.AppKey[Gateway]("gateway")
CONFIG = web.AppKey("config", HttpConfig)
GATE = web.AppKey("gate", Gate)


@web.middleware
async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
    """Everything around a handler, in one layer (each middleware layer costs per request):
    the SERVER span (named by route template, current while the handler runs, so the NATS
    request is its child), API keys (see :func:`needs_scope`), the
    bound on requests in flight, the body read within ``body_timeout_s`` (else 408 and the
    connection closed: a slow client holds no handler nor slot), and errors as {"error"}
    with their status."""
    state = request.app[GATE]
    span = token = None
    if state.traced:
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        span = tracing.start_server_span(request.method, route, request.path, request.headers)
        token = tracing.activate(span)
    try:
        response = refused(request, state)
        if response is None:
            response = await _handled(request, handler, state)
        if span is not None and span.is_recording():
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracing.mark_error(span, str(response.status), getattr(response, "text", "") or "")
        return response
    finally:
        if span is not None:
            tracing.deactivate(token)
            span.end()


def refused(request: web.Request, state: Gate) -> web.StreamResponse | None:
    """The gate's refusal before any work: a missing or weak API key (401/403), or the bound on
    requests in flight (429); None lets the request in."""
    config = state.config
    api_keys = config.api_keys
    needed = needs_scope(request) if api_keys else None
    if needed is not None and api_keys:
        scope = api_keys.scope_of(presented_key(request.headers))
        if scope is None:
            return family_error(
                request,
                401,
                "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                {"WWW-Authenticate": 'Bearer realm="aimesh"'},
            )
        if needed == "admin" and scope != "admin":
            needs = f"this API key has the {scope} scope: {request.path} needs the admin scope"
            return family_error(request, 403, needs)
    if state.in_flight >= config.max_concurrency:
        return family_error(
            request,
            429,
            f"gateway busy ({state.in_flight} requests in flight, limit {config.max_concurrency}): retry later",
            {"Retry-After": "1"},
        )
    return None


async def _handled(request: web.Request, handler: Any, state: Gate) -> web.StreamResponse:
    """The handler's response, holding an in-flight slot; its errors as the route's error body."""
    config = state.config
    state.in_flight += 1
    try:
        edge.check_path(request.match_info)  # before any handler names a subject or key
        await read_body(request, config.body_timeout_s)  # cached: the handler's read() is instant
        response: web.StreamResponse = await handler(request)
    except BodyTimeout as exc:
        response = timed_out(family_error(request, 408, str(exc)))
    except web.HTTPRequestEntityTooLarge:
        response = family_error(request, 413, f"request body over the limit of {config.max_body_bytes} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = route_error(request, exc)
    except (ServiceError, MeshTimeout) as exc:
        response = gate_error(request, exc)
    finally:
        state.in_flight -= 1
    return response


def deadline_s(request: web.Request) -> float:
    return edge.timeout_s(request.headers.get(TIMEOUT_HEADER), TIMEOUT_HEADER, request.app[CONFIG].timeout_s)


async def live(_: web.Request) -> web.Response:
    # Open Inference Protocol v2: the status code carries the answer, the body mirrors it.
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = request.app[GATEWAY].is_ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    version = request.app[GATEWAY].version
    return web.json_response({"name": SERVER_NAME, "version": version, "extensions": ["binary_tensor_data"]})


async def model_metadata(request: web.Request) -> web.Response:
    m, v = request.match_info["model"], request.match_info.get("version")
    return web.json_response(await request.app[GATEWAY].model_metadata(m, v))


async def model_ready(request: web.Request) -> web.Response:
    # 404 (raised) when not deployed; 503 while deployed but not served by any worker yet.
    model, version = request.match_info["model"], request.match_info.get("version")
    ok = await request.app[GATEWAY].model_ready(model, version)
    body: dict[str, Any] = {"name": model, "ready": ok}
    if version:
        body["version"] = version
    return web.json_response(body, status=200 if ok else 503)


async def infer(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    model, version = request.match_info["model"], request.match_info.get("version")
    raw = await request.read()
    length = request.headers.get(oip.HEADER_LENGTH)
    try:
        header_length = int(length) if length is not None else None
    except ValueError:
        return error(400, f"{oip.HEADER_LENGTH} is not a number")
    body, inputs = oip.parse_request(raw, header_length)
    if "respond-async" in request.headers.get("Prefer", "") or request.query.get("async") in ("1", "true"):
        # Its id names a subject: the durable rule (a token) before anything else.
        given = durable.request_id(body.id or request.headers.get("Idempotency-Key"))
        rid, served = await gw.submit_durable(model, version, inputs, given, request.headers)
        location = f"/v2/results/{rid}"
        return web.json_response(
            {"id": rid, "state": "pending", "model_name": model, "model_version": served, "result_url": location},
            status=202,
            headers={"Location": location, VARIANT: served},
        )
    # Every request gets an id (the caller's, else a new one): feedback names it later.
    request_id = edge.check_request_id(body.id) if body.id else edge.new_request_id()
    served_version, outputs = await gw.infer(model, version, inputs, request_id, deadline_s(request), request.headers)
    wanted = {o.name for o in body.outputs}
    if wanted:
        if LABEL in wanted and "class" in outputs:
            names = await gw.class_names(model, served_version)
            if names:
                outputs[LABEL] = oip.class_labels(outputs["class"], names)
        missing = wanted - outputs.keys()
        if missing:
            return error(400, f"unknown outputs {sorted(missing)}; the model has {sorted(outputs)}")
        outputs = {k: v for k, v in outputs.items() if k in wanted}
    payload, json_length = oip.encode_response(
        model=model, version=served_version, request_id=request_id, outputs=outputs, binary=oip.binary_outputs(body)
    )
    headers = {VARIANT: served_version, REQUEST_ID: request_id}
    if json_length is None:
        return web.Response(body=payload, content_type="application/json", headers=headers)
    headers[oip.HEADER_LENGTH] = str(json_length)
    return web.Response(body=payload, content_type="application/octet-stream", headers=headers)


async def result(request: web.Request) -> web.Response:
    outcome = await request.app[GATEWAY].durable_result(request.match_info["id"])
    if outcome.state == "pending":
        return web.json_response({"id": outcome.id, "state": "pending"}, status=202, headers={"Retry-After": "1"})
    if outcome.state == "error":
        return error(outcome.code or 500, outcome.error)
    outputs = {k: from_wire(t, k) for k, t in outcome.outputs.items()}
    payload, _ = oip.encode_response(
        model=outcome.model, version=outcome.version, request_id=outcome.id, outputs=outputs, binary=False
    )
    return web.Response(body=payload, content_type="application/json", headers={VARIANT: outcome.version})


async def put_split(request: web.Request) -> web.Response:
    split = edge.check_split(edge.decode(_split, await request.read(), "split"))
    if split.model != request.match_info["model"]:
        return error(400, f"the body names model {split.model!r}, the path {request.match_info['model']!r}")
    return web.json_response(msgspec.to_builtins(await request.app[GATEWAY].set_split(split)))


async def get_split(request: web.Request) -> web.Response:
    split = request.app[GATEWAY].get_split(request.match_info["model"])
    if split is None:
        return error(404, f"model {request.match_info['model']!r} has no split")
    return web.json_response(msgspec.to_builtins(split))


async def delete_split(request: web.Request) -> web.Response:
    await request.app[GATEWAY].delete_split(request.match_info["model"])
    return web.Response(status=204)


async def feedback(request: web.Request) -> web.Response:
    fb = edge.decode(_feedback, await request.read(), "feedback")
    check_name(fb.model, "model name")
    if fb.variant:
        check_name(fb.variant, "variant version")
    await request.app[GATEWAY].feedback(fb, request.headers.get("Idempotency-Key"))
    return web.json_response({"id": fb.id, "model": fb.model, "accepted": True}, status=202)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[GATEWAY].version))


def build_app(
    gw: Gateway,
    *,
    max_body_bytes: int,
    timeout_s: float = 30.0,
    max_concurrency: int = 1024,
    api_keys: KeyRing | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> web.Application:
    """The OIP application over ``gw``: its keys, the :func:`gate` middleware and the routes."""
    config = HttpConfig(
        max_body_bytes=max_body_bytes,
        timeout_s=timeout_s,
        max_concurrency=max_concurrency,
        body_timeout_s=body_timeout_s,
        api_keys=api_keys,
    )
    app = web.Application(client_max_size=max_body_bytes, middlewares=[gate])
    app[GATEWAY] = gw
    app[CONFIG] = config
    app[GATE] = Gate(config, traced=not tracing.tracing_disabled())
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/results/{id}", result)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_put("/admin/splits/{model}", put_split)
    app.router.add_get("/admin/splits/{model}", get_split)
    app.router.add_delete("/admin/splits/{model}", delete_split)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(f"{base}/ready", model_ready)
        app.router.add_post(f"{base}/infer", infer)
    return app
