"""Slow clients cannot pin the gateway: raw sockets against a real router process (on a real
nats-server).  A body that stops short is a 408 in the route's convention within
``body_timeout_s`` and frees its in-flight slot; a request head that stops short is a closed
connection within ``header_timeout_s``; meanwhile the router serves everyone else."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from shared.names import Names
from tests.helpers import ServiceProcess, eventually

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
LINGER_S = 10.0  # aiohttp reads what is left of a late body this long after the 408, then closes


async def start_router(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, **env: str
) -> tuple[ServiceProcess, str]:
    router = spawn(
        "services.router",
        AIMESH_ROUTER_PORT="0",
        AIMESH_ROUTER_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        AIMESH_ROUTER_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        **env,
    )
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    return router, base


async def connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(base)
    return await asyncio.open_connection(url.hostname, url.port)


def partial_body(path: str, declared: int = 1000, sent: int = 10) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    return head.encode() + b"{" + b" " * (sent - 1)


async def read_response(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict[str, str], Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout_s)
    return int(status_line.split()[1]), headers, json.loads(body)


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the server closes the connection within ``timeout_s`` (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(4096), timeout_s):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def live(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(f"{base}/v2/health/live") as resp:
        return resp.status


async def test_a_partial_body_is_408_in_the_routes_convention_and_the_connection_closes(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    oip_reader, oip_writer = await connect(base)
    openai_reader, openai_writer = await connect(base)
    t0 = time.monotonic()
    oip_writer.write(partial_body("/v2/models/digits/infer"))
    openai_writer.write(partial_body("/v1/completions"))
    # Meanwhile the router serves others at once.
    assert await live(http, base) == 200
    assert time.monotonic() - t0 < BODY_TIMEOUT_S
    status, headers, body = await read_response(oip_reader, BODY_TIMEOUT_S + 5)
    assert time.monotonic() - t0 < BODY_TIMEOUT_S + 3
    assert status == 408 and headers["connection"] == "close", (status, headers, body)
    assert set(body) == {"error"} and "did not arrive within 1 s" in body["error"], body
    status, headers, body = await read_response(openai_reader, BODY_TIMEOUT_S + 5)
    assert status == 408 and headers["connection"] == "close", (status, headers, body)
    assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error", body
    assert "did not arrive within" in body["error"]["message"], body
    assert await closed_within(oip_reader, LINGER_S + 5)
    for writer in (oip_writer, openai_writer):
        writer.close()
    assert router.proc.poll() is None and "Traceback" not in router.output(), router.output()


async def test_slow_bodies_give_back_their_in_flight_slots(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    _, base = await start_router(spawn, nats_url, names, AIMESH_ROUTER_MAX_CONCURRENCY="2")
    slow = [await connect(base) for _ in range(2)]
    for _, writer in slow:
        writer.write(partial_body("/v2/models/digits/infer"))
        await writer.drain()

    async def both_held() -> bool:  # both slots are held by the slow bodies...
        return await live(http, base) == 429

    await eventually(both_held, BODY_TIMEOUT_S, "the slow bodies to hold both in-flight slots before their deadline")
    for reader, _ in slow:
        status, _, _ = await read_response(reader, BODY_TIMEOUT_S + 5)
        assert status == 408
    assert await live(http, base) == 200  # ...until their deadline, not forever
    for _, writer in slow:
        writer.close()


async def test_a_partial_request_head_is_closed_and_others_are_served(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    router, base = await start_router(spawn, nats_url, names)
    half_line = await connect(base)
    half_line[1].write(b"POST /v2/models/digits/in")
    half_headers = await connect(base)
    half_headers[1].write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    silent = await connect(base)
    t0 = time.monotonic()
    assert await live(http, base) == 200
    trickle = await connect(base)
    for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n":  # a byte at a time re-arms nothing
        trickle[1].write(bytes([byte]))
        await asyncio.sleep(0.05)
        if trickle[0].at_eof():
            break
    for reader, _ in (half_line, half_headers, silent, trickle):
        assert await closed_within(reader, HEADER_TIMEOUT_S + 3)
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 4
    assert await live(http, base) == 200
    for _, writer in (half_line, half_headers, silent, trickle):
        writer.close()
    assert router.proc.poll() is None and "Traceback" not in router.output(), router.output()


async def test_the_shared_server_bounds_heads_and_bodies_for_every_app() -> None:
    """What the metrics service (and every aimesh HTTP server) gets from shared.httpserve."""
    from aiohttp import web

    from shared.httpserve import body_deadline, serve_app

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    app = web.Application(middlewares=[body_deadline(0.5)])
    app.router.add_post("/echo", echo)
    runner, base = await serve_app(app, "127.0.0.1", 0, header_timeout_s=0.5)
    try:
        reader, writer = await connect(base)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        status, _, body = await read_response(reader, 2)
        assert (status, body) == (200, {"bytes": 2})  # a whole body is served as ever
        writer.write(partial_body("/echo"))
        status, headers, body = await read_response(reader, 3)
        assert status == 408 and headers["connection"] == "close", (status, headers, body)
        assert body == {"error": "the request body did not arrive within 0.5 s"}
        writer.close()
        reader, writer = await connect(base)
        writer.write(b"POST /ec")
        assert await closed_within(reader, 2)
        writer.close()
    finally:
        await runner.cleanup()
