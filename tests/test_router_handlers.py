"""The router's HTTP layer in-process: each handler and the gate served by aiohttp's test server
over a fake gateway (the HTTP layer is the unit here: the fake stands for the routing and the
mesh behind :class:`~services.router.http.Gateway` and
:class:`~services.router.openai.LanguageModels`; the real-process tests cover those)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.router.http import GATE, REQUEST_ID, VARIANT, build_app, parse_keys
from services.router.oip import HEADER_LENGTH
from services.router.openai import ChatMessage, add_routes
from shared.errors import MeshTimeout, NotFound, Overloaded, Unavailable
from shared.schemas import DurableResult, Feedback, GenerateChunk, GenerateRequest, Split, Variant
from shared.tensors import to_wire

Client = TestClient[web.Request, web.Application]
ONE_INPUT = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
ADMIN_KEY, INFER_KEY = "admin-key", "infer-key"


class FakeGateway:
    """Both sides of the gateway (OIP and OpenAI) over canned answers; records what it was asked.
    ``fail`` is raised by every call that can fail; ``hold``, when set, keeps an inference
    waiting until it is set."""

    version = "9.9.9"

    def __init__(self) -> None:
        self.is_ready = True
        self.served = "3"
        self.outputs: dict[str, np.ndarray] = {"y": np.array([[0.5, 1.5]], dtype=np.float32)}
        self.ready: bool = True
        self.fail: Exception | None = None
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.splits: dict[str, Split] = {}
        self.durable = DurableResult(id="r1", state="pending")
        self.lm = ["tiny"]
        self.chunks = [
            GenerateChunk(text="Hel", index=0),
            GenerateChunk(text="lo", index=1, done=True, finish_reason="stop", prompt_tokens=2, completion_tokens=2),
        ]
        self.calls: list[tuple[str, Any]] = []

    def _called(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        self._called("infer", model, version, inputs, request_id, timeout_s)
        return self.served, dict(self.outputs)

    async def set_split(self, split: Split) -> Split:
        self._called("set_split", split)
        self.splits[split.model] = split
        return split

    async def submit_durable(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        self._called("submit_durable", model, version, request_id)
        return request_id or "queued-1", self.served

    async def durable_result(self, request_id: str) -> DurableResult:
        self._called("durable_result", request_id)
        return self.durable

    def get_split(self, model: str) -> Split | None:
        return self.splits.get(model)

    async def delete_split(self, model: str) -> None:
        self._called("delete_split", model)
        self.splits.pop(model, None)

    async def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        self._called("model_metadata", model, version)
        return {"name": model, "versions": [version or self.served]}

    async def model_ready(self, model: str, version: str | None) -> bool:
        self._called("model_ready", model, version)
        return self.ready

    async def class_names(self, model: str, version: str) -> list[str]:
        return ["cat", "dog"]

    async def feedback(self, fb: Feedback, idempotency_key: str | None) -> None:
        self._called("feedback", fb, idempotency_key)

    def lm_models(self) -> list[str]:
        return list(self.lm)

    async def generate(
        self, model: str, req: GenerateRequest, chat: list[ChatMessage] | None = None
    ) -> AsyncIterator[GenerateChunk]:
        self._called("generate", model, req, chat)
        for chunk in self.chunks:
            yield chunk


@contextlib.asynccontextmanager
async def served(gw: FakeGateway, **limits: Any) -> AsyncIterator[Client]:
    """The router's application (OIP and OpenAI routes) over ``gw``, on a test server."""
    app = build_app(gw, max_body_bytes=limits.pop("max_body_bytes", 1 << 20), **limits)
    add_routes(app, gw)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_health_metadata_and_the_openapi_document_answer_from_the_gateway() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.get("/v2/health/live")
        assert (resp.status, await resp.json()) == (200, {"live": True})
        resp = await client.get("/v2/health/ready")
        assert (resp.status, await resp.json()) == (200, {"ready": True})
        gw.is_ready = False
        resp = await client.get("/v2/health/ready")
        assert (resp.status, await resp.json()) == (503, {"ready": False})
        resp = await client.get("/v2")
        assert await resp.json() == {"name": "aimesh", "version": "9.9.9", "extensions": ["binary_tensor_data"]}
        resp = await client.get("/openapi.json")
        assert resp.status == 200 and (await resp.json())["info"]["version"] == "9.9.9"
        resp = await client.get("/v2/models/digits/versions/2")
        assert await resp.json() == {"name": "digits", "versions": ["2"]}
    assert ("model_metadata", ("digits", "2")) in gw.calls


async def test_infer_maps_the_gateways_outputs_to_oip_json() -> None:
    gw = FakeGateway()
    async with served(gw, timeout_s=30.0) as client:
        body = ONE_INPUT | {"id": "req-1"}
        resp = await client.post("/v2/models/digits/infer", json=body, headers={"Aimesh-Timeout-Ms": "500"})
        assert resp.status == 200, await resp.text()
        assert resp.headers[VARIANT] == "3" and resp.headers[REQUEST_ID] == "req-1"
        assert await resp.json() == {
            "model_name": "digits",
            "model_version": "3",
            "id": "req-1",
            "outputs": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}],
        }
    [(name, (model, version, inputs, request_id, timeout_s))] = gw.calls
    assert (name, model, version, request_id, timeout_s) == ("infer", "digits", None, "req-1", 0.5)
    np.testing.assert_array_equal(inputs["x"], np.array([[1.0, 2.0]], dtype=np.float32))


async def test_infer_answers_binary_outputs_when_asked() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        body = ONE_INPUT | {"parameters": {"binary_data_output": True}}
        resp = await client.post("/v2/models/digits/versions/3/infer", json=body)
        assert resp.status == 200 and resp.content_type == "application/octet-stream"
        raw = await resp.read()
    n = int(resp.headers[HEADER_LENGTH])
    header = msgspec.json.decode(raw[:n])
    assert header["outputs"] == [
        {"name": "y", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
    ]
    assert raw[n:] == gw.outputs["y"].tobytes()
    assert REQUEST_ID in resp.headers  # a new id when the caller gave none


async def test_infer_returns_the_outputs_asked_for_by_name_with_class_labels() -> None:
    gw = FakeGateway()
    gw.outputs = {"logits": np.zeros((1, 2), np.float32), "class": np.array([1], np.int64)}
    async with served(gw) as client:
        resp = await client.post("/v2/models/digits/infer", json=ONE_INPUT | {"outputs": [{"name": "label"}]})
        assert (await resp.json())["outputs"] == [{"name": "label", "shape": [1], "datatype": "BYTES", "data": ["dog"]}]
        resp = await client.post("/v2/models/digits/infer", json=ONE_INPUT | {"outputs": [{"name": "z"}]})
        assert resp.status == 400
        assert await resp.json() == {"error": "unknown outputs ['z']; the model has ['class', 'logits']"}


async def test_async_infer_is_queued_and_its_result_read_back() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.post("/v2/models/digits/infer?async=1", json=ONE_INPUT | {"id": "job-1"})
        assert resp.status == 202 and resp.headers["Location"] == "/v2/results/job-1"
        assert (await resp.json())["state"] == "pending"
        resp = await client.get("/v2/results/job-1")
        assert (resp.status, resp.headers["Retry-After"]) == (202, "1")
        gw.durable = DurableResult(id="job-1", state="error", error="queue full", code=429)
        resp = await client.get("/v2/results/job-1")
        assert (resp.status, await resp.json()) == (429, {"error": "queue full"})
        y = np.array([2.0], np.float32)
        gw.durable = DurableResult(id="job-1", state="done", model="digits", version="3", outputs={"y": to_wire(y)})
        resp = await client.get("/v2/results/job-1")
        assert resp.status == 200 and resp.headers[VARIANT] == "3"
        assert (await resp.json())["outputs"] == [{"name": "y", "shape": [1], "datatype": "FP32", "data": [2.0]}]


async def test_model_ready_is_200_503_or_the_gateways_404() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.get("/v2/models/digits/ready")
        assert (resp.status, await resp.json()) == (200, {"name": "digits", "ready": True})
        gw.ready = False
        resp = await client.get("/v2/models/digits/versions/2/ready")
        assert (resp.status, await resp.json()) == (503, {"name": "digits", "ready": False, "version": "2"})
        gw.fail = NotFound("model 'digits' is not deployed")
        resp = await client.get("/v2/models/digits/ready")
        assert (resp.status, await resp.json()) == (404, {"error": "model 'digits' is not deployed"})


async def test_a_gateway_error_becomes_its_status_in_the_familys_convention() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        gw.fail = Overloaded("queue full (4 waiting, limit 4)", retry_after_s=2.4)
        resp = await client.post("/v2/models/digits/infer", json=ONE_INPUT)
        assert (resp.status, resp.headers["Retry-After"]) == (429, "2")
        assert await resp.json() == {"error": "queue full (4 waiting, limit 4)"}
        gw.fail = MeshTimeout("aimesh.infer.digits.3", 0.5)
        resp = await client.post("/v2/models/digits/infer", json=ONE_INPUT)
        assert (resp.status, await resp.json()) == (504, {"error": "no reply on aimesh.infer.digits.3 within 0.5s"})
        gw.fail = Unavailable("no inference worker generates with tiny@1 (start workers)")
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi"})
        assert resp.status == 503
        assert await resp.json() == {
            "error": {
                "message": "no inference worker generates with tiny@1 (start workers)",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }


async def test_a_path_that_is_not_a_token_is_400_before_any_handler() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.get("/v2/models/a.b/ready")
        assert resp.status == 400 and "must be letters, digits" in (await resp.json())["error"]
        resp = await client.get("/v2/nothing")
        assert (resp.status, await resp.json()) == (404, {"error": "no route GET /v2/nothing: see /openapi.json"})
    assert gw.calls == []


async def test_split_routes_store_read_and_delete_through_the_gateway() -> None:
    gw = FakeGateway()
    split = {"model": "digits", "variants": [{"version": "1", "weight": 1}]}
    async with served(gw) as client:
        resp = await client.get("/admin/splits/digits")
        assert (resp.status, await resp.json()) == (404, {"error": "model 'digits' has no split"})
        resp = await client.put("/admin/splits/other", json=split)
        assert (resp.status, await resp.json()) == (400, {"error": "the body names model 'digits', the path 'other'"})
        resp = await client.put("/admin/splits/digits", json=split)
        assert resp.status == 200 and (await resp.json())["variants"] == [{"version": "1", "weight": 1.0}]
        assert gw.splits["digits"].variants == [Variant(version="1", weight=1.0)]
        resp = await client.get("/admin/splits/digits")
        assert (await resp.json())["model"] == "digits"
        resp = await client.delete("/admin/splits/digits")
        assert resp.status == 204 and "digits" not in gw.splits


async def test_feedback_is_checked_then_accepted() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.post("/v1/feedback", json={"id": "r1", "model": "a b"})
        assert resp.status == 400 and "model name" in (await resp.json())["error"]
        body = {"id": "r1", "model": "digits", "reward": 0.0}
        resp = await client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"})
        assert (resp.status, await resp.json()) == (202, {"id": "r1", "model": "digits", "accepted": True})
    assert gw.calls == [("feedback", (Feedback(id="r1", model="digits", reward=0.0), "k1"))]


async def test_the_gate_asks_for_keys_and_the_admin_scope_except_on_open_routes() -> None:
    keys = parse_keys([f"{ADMIN_KEY}:admin", f"{INFER_KEY}:infer"])
    async with served(FakeGateway(), api_keys=keys) as client:
        assert (await client.get("/v2/health/ready")).status == 200
        resp = await client.get("/v2/models/digits/ready")
        assert (resp.status, resp.headers["WWW-Authenticate"]) == (401, 'Bearer realm="aimesh"')
        assert await resp.json() == {
            "error": "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)"
        }
        resp = await client.get("/v1/models", headers={"X-API-Key": "wrong"})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
        infer_only = {"Authorization": f"Bearer {INFER_KEY}"}
        assert (await client.get("/v2/models/digits/ready", headers=infer_only)).status == 200
        resp = await client.get("/admin/splits/digits", headers=infer_only)
        assert resp.status == 403
        assert await resp.json() == {
            "error": "this API key has the infer scope: /admin/splits/digits needs the admin scope"
        }
        resp = await client.get("/admin/splits/digits", headers={"X-API-Key": ADMIN_KEY})
        assert resp.status == 404  # past the gate: the split is not there


async def test_the_gate_bounds_requests_in_flight() -> None:
    gw = FakeGateway()
    gw.hold = asyncio.Event()
    async with served(gw, max_concurrency=1) as client:
        first = asyncio.create_task(client.post("/v2/models/digits/infer", json=ONE_INPUT))
        await asyncio.wait_for(gw.entered.wait(), 5)
        assert client.app is not None and client.app[GATE].in_flight == 1
        resp = await client.get("/v2/health/live")
        assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
        assert await resp.json() == {"error": "gateway busy (1 requests in flight, limit 1): retry later"}
        resp = await client.get("/v1/models")
        assert resp.status == 429 and (await resp.json())["error"]["type"] == "rate_limit_error"
        gw.hold.set()
        resp = await asyncio.wait_for(first, 5)
        assert resp.status == 200
        assert client.app[GATE].in_flight == 0
        assert (await client.get("/v2/health/live")).status == 200


async def test_openai_models_are_the_gateways_language_models() -> None:
    async with served(FakeGateway()) as client:
        resp = await client.get("/v1/models")
        assert await resp.json() == {
            "object": "list",
            "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "aimesh"}],
        }
        assert (await (await client.get("/v1/models/tiny")).json())["id"] == "tiny"
        resp = await client.get("/v1/models/digits")
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": "model 'digits' is not a deployed language model (GET /v1/models lists them)",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }


async def test_a_completion_not_found_is_openais_model_not_found() -> None:
    gw = FakeGateway()
    gw.fail = NotFound("model 'digits' is not a language model")
    async with served(gw) as client:
        resp = await client.post("/v1/chat/completions", json={"model": "digits", "messages": []})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"
        body = {"model": "digits", "messages": [{"role": "user", "content": "Hi"}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")


async def test_a_whole_completion_joins_the_chunks() -> None:
    gw = FakeGateway()
    async with served(gw) as client:
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        body = await resp.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    [(_, (model, req, chat))] = gw.calls
    assert (model, req.prompt, req.max_tokens, chat) == ("tiny", "Hi", 2, None)


async def test_a_streamed_chat_completion_sends_events_ending_in_done() -> None:
    gw = FakeGateway()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with served(gw) as client:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        text = await resp.text()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    [(_, (_, _, chat))] = gw.calls
    assert chat == [ChatMessage(role="user", content="Hi")]
