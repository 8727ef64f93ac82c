"""Service processes under faults: SIGTERM under load, a NATS restart, health probes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.discovery import discover
from shared.errors import MeshTimeout, Unavailable
from shared.names import Names
from shared.natsserver import NatsServer
from shared.schemas import MicroStats
from tests.apps.echo import EchoReply, EchoRequest
from tests.helpers import ServiceProcess, eventually, free_port

pytestmark = pytest.mark.slow


async def test_sigterm_during_load_answers_every_accepted_request(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    echo = spawn("tests.apps.echo", AIMESH_MAX_CONCURRENCY="8", AIMESH_MAILBOX_SIZE="200")
    ping = await echo.wait_ready(nats_url, names.micro_name("echo"))
    subject = names.endpoint("echo", "echo")
    n = 60
    calls = [
        asyncio.create_task(request(nc, subject, EchoRequest(text=f"r{i}", delay_s=0.2), EchoReply, timeout_s=30))
        for i in range(n)
    ]

    async def all_accepted() -> bool:
        # Every request has reached the service: 8 run, the rest wait in its mailbox.
        for st in await discover(nc, "STATS", MicroStats, name=names.micro_name("echo"), wait_s=0.3):
            if st.id == ping.id:
                ep = next(e for e in st.endpoints if e.name == "echo")
                return ep.num_requests + int((ep.data or {}).get("queued", 0)) >= n
        return False

    await eventually(all_accepted, 10, "all requests to reach the service")
    echo.terminate()
    replies = await asyncio.gather(*calls)
    assert sorted(r.text for r in replies) == sorted(f"r{i}" for i in range(n))
    assert await asyncio.to_thread(echo.wait, 30) == 0, echo.output()
    assert "echo stopped" in echo.output()


async def test_service_resumes_after_the_nats_server_restarts(
    spawn: Callable[..., ServiceProcess], names: Names, tmp_path: Path
) -> None:
    server = NatsServer(store_dir=tmp_path / "store", port=free_port(), http_port=None)
    server.start()
    try:
        echo = spawn("tests.apps.echo", url=server.url, AIMESH_HEALTH_PORT="0")
        ping = await echo.wait_ready(server.url, names.micro_name("echo"))
        health = ping.metadata["health"]
        subject = names.endpoint("echo", "echo")
        async with aiohttp.ClientSession() as http:
            assert await _status(http, f"{health}/readyz") == 200
            assert (await _call(server.url, subject, "before")).text == "before"

            server.stop()
            # Not ready while NATS is gone, but alive: an orchestrator must not restart it.
            await eventually(lambda: _is(http, f"{health}/readyz", 503), 10, "readiness to drop")
            assert await _status(http, f"{health}/livez") == 200

            server.start()

            async def answered() -> EchoReply | None:
                try:
                    return await _call(server.url, subject, "after")
                except (Unavailable, MeshTimeout, OSError, nats.errors.Error):
                    return None  # not reconnected yet: no server, no responder, or no reply in time

            reply = await eventually(answered, 20, "the service to answer after the restart")
            assert reply.instance == ping.id  # the same process, never restarted
            await eventually(lambda: _is(http, f"{health}/readyz", 200), 10, "readiness to return")
        assert echo.proc.poll() is None
        echo.terminate()
        assert await asyncio.to_thread(echo.wait, 20) == 0
    finally:
        server.stop()


async def _call(url: str, subject: str, text: str) -> EchoReply:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
    try:
        return await request(nc, subject, EchoRequest(text=text), EchoReply, timeout_s=1)
    finally:
        await nc.close()


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def _is(http: aiohttp.ClientSession, url: str, status: int) -> Any:
    return await _status(http, url) == status
