"""The OpenAPI document describes exactly the routes the gateway serves."""

from __future__ import annotations

from typing import Any

from services.router.http import build_app
from services.router.openai import add_routes
from services.router.openapi import document


class _Routes:
    """Only route registration is exercised: nothing here is called."""

    version = "0.0.0"
    is_ready = True

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} must not be called while building routes")


def test_every_route_is_documented_and_nothing_else() -> None:
    app = build_app(_Routes(), max_body_bytes=1024)  # type: ignore[arg-type]
    add_routes(app, _Routes())  # type: ignore[arg-type]
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    doc = document("0.0.0")
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == described
    assert doc["openapi"] == "3.1.0"


def _statuses(doc: dict[str, Any], path: str, method: str) -> set[int]:
    return {int(code) for code in doc["paths"][path][method]["responses"]}


OPEN_ROUTES = {"/openapi.json", "/v2/health/live", "/v2/health/ready"}


def _assert_gate_statuses(doc: dict[str, Any], path: str, method: str, op: dict[str, Any]) -> None:
    """The statuses the router's gate can answer before the handler: throttling, auth, admin
    scope, body limits, bad path tokens (which also carry the token pattern)."""
    statuses = _statuses(doc, path, method)
    assert 429 in statuses, (path, method)
    if path not in OPEN_ROUTES:
        assert 401 in statuses, (path, method)
    if path.startswith("/admin/"):
        assert 403 in statuses, (path, method)
    if "requestBody" in op:
        assert {408, 413} <= statuses, (path, method)
    if "{" in path:
        assert 400 in statuses, (path, method)
        for param in op["parameters"]:
            if param["in"] == "path":
                assert param["schema"]["pattern"] == "^[A-Za-z0-9_-]+$", (path, param)


def _assert_family_error_body(path: str, method: str, op: dict[str, Any]) -> None:
    """Every error response with a schema names the route family's error body."""
    family = "OpenAIError" if path.startswith("/v1/") and path != "/v1/feedback" else "Error"
    for code, response in op["responses"].items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if int(code) >= 400 and schema.get("$ref", "").startswith("#/components/schemas/"):
            assert schema["$ref"].endswith(f"/{family}"), (path, method, code, schema)


def test_every_route_lists_the_gates_statuses_and_its_familys_error_body() -> None:
    doc = document("0.0.0")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            _assert_gate_statuses(doc, path, method, op)
            _assert_family_error_body(path, method, op)


def test_the_openai_routes_take_exactly_the_parameters_the_router_decodes() -> None:
    from services.router.openai import ChatBody, CompletionBody

    schemas = document("0.0.0")["components"]["schemas"]
    for name, body in (("CompletionRequest", CompletionBody), ("ChatCompletionRequest", ChatBody)):
        assert set(schemas[name]["properties"]) == set(body.__struct_fields__), name
        assert schemas[name]["additionalProperties"] is False  # unknown fields are 400s


async def test_a_bad_path_token_under_v1_is_openais_error_object() -> None:
    import aiohttp

    from shared.httpserve import serve_app

    app = build_app(_Routes(), max_body_bytes=1024)  # type: ignore[arg-type]
    add_routes(app, _Routes())  # type: ignore[arg-type]
    runner, base = await serve_app(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/models/a.b") as resp:
            body = await resp.json()
    finally:
        await runner.cleanup()
    assert resp.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "must be letters, digits" in body["error"]["message"], body
