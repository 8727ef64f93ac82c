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
    add_routes(app, lambda: [], lambda model, req: None)  # type: ignore[arg-type, return-value]
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    doc = document("0.0.0")
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == described
    assert doc["openapi"] == "3.1.0"
