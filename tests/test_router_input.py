"""No client input reaches a 5xx: hostile names, shapes, bytes, headers and numbers sent over real
HTTP to a real router process (on a real nats-server) are each a 4xx with a JSON body in the
route's convention, and the router keeps serving.  See docs/serving.md, "Bad input"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.names import Names
from shared.schemas import Deployment, DeployRequest
from tests.helpers import ServiceProcess, eventually, oip_error, send
from tests.mesh import deploy_digits, register_lm, serving, start_gateway

pytestmark = pytest.mark.slow

# Percent-encoded path segments that are not subject tokens: a space, a dot, the wildcards, a
# subject-separator spelled %2E, unicode.
BAD_SEGMENTS = ["a%20b", "a.b", "a*", "%3E", "a%3Eb", "a%2Eb", "%C3%A9t%C3%A9", "a%09b", "a%00b"]
BAD_NAMES = ["a b", "a.b", "*", ">", "a.*", "été", ""]
ONE_INPUT = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


async def start_router(spawn: Callable[..., ServiceProcess], nats_url: str, names: Names) -> tuple[ServiceProcess, str]:
    router = spawn("services.router", AIMESH_ROUTER_PORT="0")
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    return router, base


def openai_error(status: int, body: Any, want: int, *, contains: str = "", param: str | None = None) -> None:
    assert status == want, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, body
    assert contains in body["error"]["message"], body


async def still_serving(http: aiohttp.ClientSession, base: str, router: ServiceProcess) -> None:
    assert router.proc.poll() is None, router.output()
    async with http.get(f"{base}/v2/health/live") as resp:
        assert resp.status == 200
    assert "Traceback" not in router.output(), router.output()


async def test_names_that_are_not_subject_tokens_are_400_on_every_route(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    for seg in BAD_SEGMENTS:
        for method, path, body in [
            ("GET", f"/v2/models/{seg}", None),
            ("GET", f"/v2/models/{seg}/ready", None),
            ("POST", f"/v2/models/{seg}/infer", ONE_INPUT),
            ("GET", f"/v2/models/m/versions/{seg}", None),
            ("GET", f"/v2/models/m/versions/{seg}/ready", None),
            ("POST", f"/v2/models/{seg}/versions/1/infer", ONE_INPUT),
            ("POST", f"/v2/models/m/versions/{seg}/infer", ONE_INPUT),
            ("GET", f"/v2/results/{seg}", None),
            ("GET", f"/admin/splits/{seg}", None),
            ("DELETE", f"/admin/splits/{seg}", None),
            ("PUT", f"/admin/splits/{seg}", {"model": "m", "variants": [{"version": "1", "weight": 1}]}),
        ]:
            status, out, _ = await send(http, method, base, path, json=body)
            oip_error(status, out, 400, contains="must be letters, digits")

    for name in BAD_NAMES:
        status, out, _ = await send(http, "POST", base, "/v1/completions", json={"model": name, "prompt": "x"})
        openai_error(status, out, 400, contains="must be letters, digits", param="model")
        status, out, _ = await send(http, "POST", base, "/v1/feedback", json={"id": "r1", "model": name})
        oip_error(status, out, 400, contains="must be letters, digits")
        for split in [
            {"model": "m", "variants": [{"version": name, "weight": 1}]},
            {"model": "m", "variants": [{"version": "1", "weight": 1}], "mirrors": [{"version": name, "percent": 5}]},
            {"model": "m", "variants": [{"version": "1", "weight": 1}], "control": name or "."},
        ]:
            status, out, _ = await send(http, "PUT", base, "/admin/splits/m", json=split)
            oip_error(status, out, 400, contains="must be letters, digits")
        if name and name.isascii():  # an empty id means "none"; header values are ASCII
            status, out, _ = await send(
                http,
                "POST",
                base,
                "/v2/models/m/infer",
                json=ONE_INPUT,
                headers={"Prefer": "respond-async", "Idempotency-Key": name},
            )
            oip_error(status, out, 400)
    # A split whose body names another model than its path.
    status, out, _ = await send(
        http, "PUT", base, "/admin/splits/m", json={"model": "n", "variants": [{"version": "1", "weight": 1}]}
    )
    oip_error(status, out, 400, contains="the body names model 'n'")
    # A synchronous request's own id travels in a response header: no spaces or control characters.
    for rid in ["a b", "a\nb", "x" * 257]:
        status, out, _ = await send(http, "POST", base, "/v2/models/m/infer", json={**ONE_INPUT, "id": rid})
        oip_error(status, out, 400, contains="request id")

    # Well-formed but unknown: 404.
    unknown: list[tuple[str, str, Any]] = [
        ("POST", "/v2/models/nope/infer", ONE_INPUT),
        ("GET", "/admin/splits/nope", None),
        ("GET", "/v2/results/nope", None),
        ("POST", "/v1/feedback", {"id": "r1", "model": "nope"}),
    ]
    for method, path, body in unknown:
        status, out, _ = await send(http, method, base, path, json=body)
        oip_error(status, out, 404)
    status, out, _ = await send(http, "POST", base, "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert status == 404 and set(out["error"]) == {"message", "type", "code", "param"}, out
    await still_serving(http, base, router)


def tensor(shape: list[int], data: Any = None, datatype: str = "FP32", **parameters: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"name": "x", "shape": shape, "datatype": datatype, "parameters": parameters}
    if data is not None:
        t["data"] = data
    return {"inputs": [t]}


async def test_shapes_that_are_negative_huge_or_overflowing_are_400(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    for body, contains in [
        (tensor([-1, -64], [0.0] * 64), "dimensions between 0 and"),
        (tensor([-1], [0.0]), "dimensions between 0 and"),
        (tensor([2**32, 2**32], []), "values do not fit shape"),  # int64 product wraps to 0
        (tensor([2**63], []), "dimensions between 0 and"),
        (tensor([2**64, 0], []), "dimensions between 0 and"),
        (tensor([0, 2**62, 4], []), "is not usable"),  # no values, but numpy refuses the shape
        (tensor([1] * 40, [1.0]), "at most 32"),
        (tensor([1], [2**64], "INT64"), "data is not a list of INT64"),
        (tensor([1], [{"a": 1}]), "data is not a list of FP32"),
        (tensor([2**32, 2**32], binary_data_size=0), "does not fit shape"),
        (tensor([1], binary_data_size="4"), "binary_data_size must be a byte count"),
        (tensor([1], binary_data_size=-4), "binary_data_size must be a byte count"),
    ]:
        status, out, _ = await send(http, "POST", base, "/v2/models/m/infer", json=body)
        oip_error(status, out, 400, contains=contains)
    status, out, _ = await send(
        http, "POST", base, "/v2/models/m/infer", data=b"{}", headers={"Inference-Header-Content-Length": "-5"}
    )
    oip_error(status, out, 400, contains="must not be negative")
    await still_serving(http, base, router)


async def test_invalid_utf8_in_a_json_string_is_400_on_every_route(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    json_type = {"Content-Type": "application/json"}
    for method, path, raw in [
        ("POST", "/v2/models/m/infer", b'{"id": "\xff", "inputs": []}'),
        (
            "POST",
            "/v2/models/m/versions/1/infer",
            b'{"inputs": [{"name": "\xed\xa0\x80", "shape": [], "datatype": "FP32"}]}',
        ),
        ("POST", "/v1/feedback", b'{"id": "r\xc3", "model": "m"}'),
        ("PUT", "/admin/splits/m", b'{"model": "m\xfe", "variants": []}'),
    ]:
        status, out, _ = await send(http, method, base, path, data=raw, headers=json_type)
        oip_error(status, out, 400, contains="not valid UTF-8")
    # The binary extension's JSON header too.
    status, out, _ = await send(
        http,
        "POST",
        base,
        "/v2/models/m/infer",
        data=b'{"inputs": [], "id": "\x80"}\x00\x00',
        headers={"Inference-Header-Content-Length": "27"},
    )
    oip_error(status, out, 400, contains="not valid UTF-8")
    status, out, _ = await send(
        http, "POST", base, "/v1/completions", data=b'{"model": "lm", "prompt": "caf\xe9"}', headers=json_type
    )
    openai_error(status, out, 400, contains="not valid UTF-8")
    await still_serving(http, base, router)


async def test_a_timeout_header_that_is_not_a_positive_finite_number_is_400(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    for value in ["nan", "NaN", "inf", "-inf", "0", "-5", "abc", "", "1e400"]:
        status, out, _ = await send(
            http, "POST", base, "/v2/models/m/infer", json=ONE_INPUT, headers={"Aimesh-Timeout-Ms": value}
        )
        oip_error(status, out, 400, contains="Aimesh-Timeout-Ms must be")
    status, out, _ = await send(
        http, "POST", base, "/v2/models/m/infer", json=ONE_INPUT, headers={"Aimesh-Timeout-Ms": "250"}
    )
    oip_error(status, out, 404)  # a good deadline: on to routing (no model here)
    await still_serving(http, base, router)


async def test_integers_too_large_for_the_wire_are_400_before_encoding(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    json_type = {"Content-Type": "application/json"}
    for field, value in [
        ("max_tokens", b"18446744073709551616"),
        ("seed", b"18446744073709551616"),
        ("seed", b"9223372036854775808"),
        ("seed", b"-9223372036854775809"),
        ("top_k", b"18446744073709551616"),
        ("temperature", b"1e400"),
    ]:
        raw = b'{"model": "lm", "prompt": "x", "%s": %s}' % (field.encode(), value)
        status, out, _ = await send(http, "POST", base, "/v1/completions", data=raw, headers=json_type)
        openai_error(status, out, 400, contains=f"$.{field}", param=field)
    await still_serving(http, base, router)


async def test_unknown_paths_and_methods_are_json_in_the_family_convention(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    for method, path in [("GET", "/nope"), ("GET", "/v2/nope"), ("POST", "/v2/models/m/explain"), ("GET", "/admin/x")]:
        status, out, _ = await send(http, method, base, path)
        oip_error(status, out, 404, contains=f"no route {method} {path}")
    for method, path in [("GET", "/v1/nope"), ("POST", "/v1/embeddings")]:
        status, out, _ = await send(http, method, base, path)
        openai_error(status, out, 404, contains=f"no route {method} {path}")
    for method, path, allowed in [
        ("DELETE", "/v2/models/m/infer", "POST"),
        ("POST", "/v2/health/live", "GET, HEAD"),
        ("POST", "/admin/splits/m", "DELETE, GET, HEAD, PUT"),
    ]:
        status, out, headers = await send(http, method, base, path)
        oip_error(status, out, 405, contains=f"allowed: {allowed}")
        assert headers["Allow"] == allowed
    status, out, headers = await send(http, "GET", base, "/v1/completions")
    openai_error(status, out, 405, contains="allowed: POST")
    assert headers["Allow"] == "POST"
    await still_serving(http, base, router)


@pytest.mark.timeout(180)
async def test_a_vanishing_temperature_is_greedy_not_a_torch_error(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, http: aiohttp.ClientSession
) -> None:

    _, router, base = await start_gateway(spawn, nats_url, names)
    await register_lm(nc, names)
    await request(nc, names.deploy, DeployRequest(model="lm"), Deployment)
    await eventually(lambda: serving(nc, names, "lm@1"), 30, "the worker to serve lm@1")

    async def complete(temperature: float) -> tuple[int, Any]:
        body = {"model": "lm", "prompt": "def main():", "max_tokens": 12, "temperature": temperature}
        status, out, _ = await send(http, "POST", base, "/v1/completions", json=body)
        return status, out

    status, greedy = await complete(0)
    assert status == 200, greedy
    for tiny in [1e-300, 5e-324, 1e-30, 1e-5]:
        status, out = await complete(tiny)
        assert status == 200, out
        assert out["choices"][0]["text"] == greedy["choices"][0]["text"]
    status, out = await complete(-1.0)
    openai_error(status, out, 400, contains="temperature must be a finite number", param="temperature")
    await still_serving(http, base, router)


async def test_a_durable_request_jetstream_cannot_store_now_is_503_with_retry_after(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    """No stream answers (here: deleted; on a cluster: a leader election after a server left):
    not the client's fault and safe to retry with the same id, so a 503 that says so, not a 500."""
    _, router, base = await start_gateway(spawn, nats_url, names)
    await deploy_digits(nc, names)
    await nc.jetstream().delete_stream(names.requests_stream)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    status, out, headers = await send(
        http,
        "POST",
        base,
        "/v2/models/digits/infer",
        json=body,
        headers={"Prefer": "respond-async", "Idempotency-Key": "r-1"},
    )
    oip_error(status, out, 503, contains="retry with the same id, 'r-1'")
    assert headers.get("Retry-After") == "2"
    await still_serving(http, base, router)
