"""The metrics dashboard over real HTTP: the page is self-contained, and its JSON API serves the
series, experiments and traces it holds (services/metrics/dashboard.py)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from shared.schemas import ExperimentReport, SpanRecord
from tests.dashboard_data import Source, filled_source, get, serve_dashboard


@pytest.fixture
async def dashboard() -> AsyncIterator[tuple[str, Source]]:
    """The dashboard's routes over a few minutes of realistic data, on a free port."""
    async with serve_dashboard(filled_source(time.time())) as served:
        yield served


async def test_page_is_served_self_contained(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    for path in ("/", "/dashboard"):
        status, html, kind = await get(url + path)
        assert (status, kind) == (200, "text/html")
        assert "<canvas" in html and "api/overview" in html
        # Meshes run offline: nothing may be fetched from elsewhere.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert "@import" not in html


async def test_overview_has_series_experiments_and_scale(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, overview, _ = await get(url + "/api/overview")
    assert status == 200
    assert abs(overview["now"] - time.time()) < 60
    assert set(overview["series"]) == {"rps", "p99_ms", "error_rate", "replicas", "lag"}
    assert set(overview["series"]["rps"]) == {"digits@1", "digits@2"}
    points = overview["series"]["replicas"]["inference"]
    assert len(points) == 240 and points[0][0] < points[-1][0]
    assert overview["experiments"][0]["model"] == "digits"
    assert overview["experiments"][0]["variants"][1]["p_value"] == 0.0004
    assert overview["scale"]["inference"]["desired"] == 3
    _, narrow, _ = await get(url + "/api/overview?window_s=30")
    assert 25 <= len(narrow["series"]["rps"]["digits@1"]) <= 31


async def test_experiment_routes(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, reports, _ = await get(url + "/api/experiments")
    assert status == 200 and [r["model"] for r in reports] == ["digits"]
    status, report, _ = await get(url + "/api/experiments/digits")
    assert status == 200
    assert msgspec.convert(report, ExperimentReport).winner == "2"
    status, missing, _ = await get(url + "/api/experiments/letters")
    assert (status, missing) == (404, {"error": "no experiment for model letters"})


async def test_trace_routes(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    status, recent, _ = await get(url + "/api/traces")
    assert status == 200 and len(recent) == 6
    assert [t["start_ns"] for t in recent] == sorted((t["start_ns"] for t in recent), reverse=True)
    assert {t["root"] for t in recent} == {"POST /v2/models/{model}/infer"}
    assert sum(t["error"] for t in recent) == 1
    _, two, _ = await get(url + "/api/traces?limit=2")
    assert len(two) == 2
    status, spans, _ = await get(url + f"/api/traces/{recent[0]['trace_id']}")
    assert status == 200
    records = msgspec.convert(spans, list[SpanRecord])
    assert [s.service for s in records] == ["router", "router", "inference", "inference", "inference"]
    assert records[1].parent_id == records[0].span_id
    status, missing, _ = await get(url + "/api/traces/" + "0" * 32)
    assert status == 404 and "no trace" in missing["error"]
