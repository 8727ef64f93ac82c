"""A real Prometheus scrapes the metrics service: it accepts the exposition, the target is up, and
the counter it stored equals the requests the mesh served. The unit tests of the renderer cannot
show that a real server parses what we write, nor that our ``instance`` label survives scraping.

Needs the ``prometheus`` binary (Debian's package, also ``promtool``): skipped without it, failed
without it in CI (``CI`` set).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.service import MetricsService
from shared.client import request
from shared.config import MeshConfig, MetricsConfig
from tests.apps.echo import EchoReply, EchoRequest, EchoService
from tests.helpers import eventually, free_port, require_binary

REQUESTS = 5


class PrometheusProcess:
    """``prometheus`` scraping one target every 2 s, on a free port with its own store; its
    log is kept for failure messages.  The scrape timeout is the whole interval: a loaded CI
    machine may take more than a few hundred ms to answer, and a timed-out scrape stores nothing."""

    def __init__(self, binary: str, target: str, work_dir: Path) -> None:
        # honor_labels, as in deploy/prometheus/prometheus.yml: the exposition's own `instance`
        # (the aimesh instance id) and `job` labels must not be renamed exported_*.
        config = work_dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n"
            "scrape_configs:\n  - job_name: aimesh\n    honor_labels: true\n    metrics_path: /metrics\n"
            f'    static_configs:\n      - targets: ["{target}"]\n'
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work_dir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        async def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            try:
                async with http.get(f"{self.url}/-/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, timeout_s, f"prometheus on {self.url} to be ready")

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """``data`` of a Prometheus HTTP API answer (``status`` must be ``success``)."""
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
async def prometheus(
    tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[Callable[[str], Awaitable[PrometheusProcess]]]:
    """start(target) -> a ready Prometheus scraping ``host:port`` of ``target``; killed at teardown."""
    binary = require_binary("prometheus")
    started: list[PrometheusProcess] = []

    async def start(target: str) -> PrometheusProcess:
        for attempt in range(3):  # the free port may be taken before prometheus binds it
            work_dir = tmp_path / f"prometheus-{attempt}"
            work_dir.mkdir()
            prom = PrometheusProcess(binary, target, work_dir)
            started.append(prom)
            try:
                await prom.wait_ready(http)
                return prom
            except AssertionError:
                if prom.proc.poll() is None or "address already in use" not in prom.output():
                    raise
        raise AssertionError("prometheus found no free port in 3 attempts")

    yield start
    for prom in started:
        prom.close()


async def promtool_check_metrics(text: str) -> tuple[int, str]:
    """``promtool check metrics`` over an exposition: 0 clean, 3 lint warnings, 1 a parse error."""
    proc = await asyncio.create_subprocess_exec(
        require_binary("promtool"),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# Each wait below has its own bound and names what it waited for; together they exceed the
# suite's default 120 s, which must not cut the test off before one of them says which failed.
@pytest.mark.timeout(240)
async def test_prometheus_stores_the_request_count_the_metrics_service_exposes(
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    nc: NatsClient,
    http: aiohttp.ClientSession,
    prometheus: Callable[[str], Awaitable[PrometheusProcess]],
) -> None:
    echo, metrics = EchoService(fast), MetricsService(fast, fast_metrics)
    async with echo, metrics:
        prom = await prometheus(metrics.http_url.removeprefix("http://"))
        for i in range(REQUESTS):
            await request(nc, echo.names.endpoint("echo", "echo"), EchoRequest(text=str(i)), EchoReply)

        exposed = f'aimesh_requests_total{{service="echo",instance="{echo.instance_id}",endpoint="echo"}} {REQUESTS}'

        async def scraped() -> str | None:
            async with http.get(f"{metrics.http_url}/metrics") as resp:
                text = await resp.text()
            return text if exposed in text else None

        text = await eventually(scraped, 15, f"{exposed!r} in the metrics service's /metrics")

        code, lint = await promtool_check_metrics(text)
        assert code in (0, 3), f"promtool check metrics rejects the exposition (exit {code}):\n{lint}"
        if lint.strip():
            print(f"promtool check metrics (naming lint, exit {code}):\n{lint}")  # shown with -rP

        # A scrape between two of the requests stores a smaller count; the next one stores the
        # full count (counters only grow), so wait for that value rather than for any sample.
        last: list[list[dict[str, Any]]] = [[]]

        async def stored() -> list[dict[str, Any]] | None:
            data = await prom.api(http, "query", query='aimesh_requests_total{service="echo",endpoint="echo"}')
            last[0] = data["result"]
            return last[0] if any(float(r["value"][1]) == REQUESTS for r in last[0]) else None

        try:
            result = await eventually(stored, 45, "a scrape of aimesh_requests_total after the requests")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer {last[0]}\nprometheus log:\n{prom.output()}") from None
        assert len(result) == 1, result
        assert result[0]["metric"]["instance"] == echo.instance_id  # honor_labels kept our label
        assert result[0]["metric"]["job"] == "aimesh"
        assert float(result[0]["value"][1]) == REQUESTS

        up = await prom.api(http, "query", query=f'aimesh_up{{service="metrics",instance="{metrics.instance_id}"}}')
        assert [float(r["value"][1]) for r in up["result"]] == [1.0]

        targets = (await prom.api(http, "targets", state="active"))["activeTargets"]
        assert [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets] == [
            (f"{metrics.http_url}/metrics", "up", "")
        ], f"prometheus log:\n{prom.output()}"
