"""The metrics dashboard's page rendered by a real headless Chromium: every chart drawn, a
screenshot kept, a trace's waterfall opened from the URL."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dashboard_data import Source, filled_source, serve_dashboard
from tests.helpers import ROOT

ARTIFACTS = ROOT / "test-artifacts"
CHART_IDS = ("chart-rps", "chart-p99", "chart-errors", "chart-replicas", "chart-lag")


@pytest.fixture
async def dashboard() -> AsyncIterator[tuple[str, Source]]:
    """The dashboard's routes over a few minutes of realistic data, on a free port."""
    async with serve_dashboard(filled_source(time.time())) as served:
        yield served


def chromium_path() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (/usr/bin/chromium not found)")
    pytest.skip("no Chromium at /usr/bin/chromium: the browser tests of the dashboard need one (apt install chromium)")


async def chromium(*args: str, timeout_s: float = 90.0) -> str:
    """Run headless Chromium with a fresh profile; returns its stdout (e.g. ``--dump-dom``)."""
    binary = chromium_path()
    with tempfile.TemporaryDirectory(prefix="aimesh-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"chromium did not finish within {timeout_s}s") from None
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    return out.decode(errors="replace")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def tag(dom: str, element_id: str) -> str:
    found = re.search(rf"<[a-z]+[^>]*\bid=\"{element_id}\"[^>]*>", dom)
    assert found, f"no element #{element_id} in the page"
    return found.group(0)


async def test_page_draws_every_chart_in_a_browser(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    dom = await chromium("--virtual-time-budget=8000", "--dump-dom", url + "/")
    assert re.search(r"<body[^>]*data-ready=\"true\"", dom), "the first overview was never rendered"
    for chart in CHART_IDS:
        assert 'data-drawn="true"' in tag(dom, chart), f"{chart} drew no series"
    assert "digits@2" in dom and "mlp-vs-cnn" in dom  # legends and the experiment table
    assert dom.count("POST /v2/models/{model}/infer") >= 6  # the recent traces


async def test_dashboard_screenshot(dashboard: tuple[str, Source]) -> None:
    url, _ = dashboard
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    await chromium("--virtual-time-budget=8000", f"--screenshot={shot}", "--window-size=1400,1000", url + "/")
    assert shot.exists(), "chromium wrote no screenshot"
    assert png_size(shot) == (1400, 1000)
    assert shot.stat().st_size > 40_000, "the screenshot is suspiciously small: an empty page?"


async def test_trace_waterfall_opens_from_the_url(dashboard: tuple[str, Source]) -> None:
    url, source = dashboard
    failed = next(t for t in source.traces.recent() if t["error"])
    page = f"{url}/#trace={failed['trace_id']}"
    dom = await chromium("--virtual-time-budget=8000", "--dump-dom", page)
    waterfall = tag(dom, "waterfall")
    assert 'data-drawn="true"' in waterfall and 'data-spans="5"' in waterfall
    assert "ERROR" in dom and "RuntimeError" in dom  # the failing span is selected, its attributes shown
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-trace.png"
    shot.unlink(missing_ok=True)
    await chromium("--virtual-time-budget=8000", f"--screenshot={shot}", "--window-size=1400,1000", page)
    assert shot.exists() and png_size(shot) == (1400, 1000)
    assert shot.stat().st_size > 30_000
