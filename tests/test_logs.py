"""Structured logs carry the trace: a record written while handling a message names its trace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from nats.aio.client import Client as NatsClient

from shared.names import Names
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.slow


async def test_json_logs_carry_the_trace_and_span_ids(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    echo = spawn(
        "tests.apps.echo",
        AIMESH_LOG_FORMAT="json",
        AIMESH_LOG_LEVEL="DEBUG",
        OTEL_SDK_DISABLED="false",
        AIMESH_TRACE_SAMPLE_RATIO="1",
    )
    await echo.wait_ready(nats_url, names.micro_name("echo"))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = await nc.request(
        names.endpoint("echo", "echo"),
        b"\xc1",
        timeout=10,
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "400"
    echo.terminate()
    assert await asyncio.to_thread(echo.wait, 20) == 0
    records = [json.loads(line) for line in echo.output().splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "service", "instance", "msg"} <= r.keys() for r in records)
    rejected = next(r for r in records if "cannot decode" in r["msg"])
    assert rejected["trace_id"] == trace_id and len(rejected["span_id"]) == 16
    assert rejected["level"] == "DEBUG" and rejected["service"] == "echo"
