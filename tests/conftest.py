"""Fixtures: a real NATS server for the whole session, and a unique mesh prefix per test.

The server is, in order of preference: ``$NATS_URL``; a testcontainers ``NatsContainer`` when a
Docker engine answers; else the ``nats-server`` binary from the venv on a free port with a
temporary store, whose max_payload is the one ``aimesh up`` gives its embedded server (32 MiB).
A Docker or ``$NATS_URL`` server keeps its own: ``bus_max_payload`` reads it, and tests that need
large messages skip when it is too small.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from shared.config import DEFAULT_NATS_MAX_PAYLOAD, MeshConfig, MetricsConfig
from shared.httpserve import serve_app
from shared.names import Names
from shared.natsserver import NatsServer
from tests.helpers import TEST_STREAM_LIMITS, ServiceProcess, service_env
from tests.otlp import OtlpReceiver

NATS_IMAGE = "nats:2.10.22-alpine"


def pytest_configure(config: pytest.Config) -> None:
    # Streams a test declares itself with load_durable_config() get the small limits too (see
    # TEST_STREAM_LIMITS); services in this process take a DurableConfig.
    for name, value in TEST_STREAM_LIMITS.items():
        os.environ.setdefault(name, value)


def _docker_answers() -> bool:
    """Whether a Docker engine answers /_ping (unix socket or DOCKER_HOST=tcp://)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host[len("unix://") :]
        elif host.startswith("tcp://"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            h, _, p = host[len("tcp://") :].partition(":")
            address = (h, int(p or 2375))
        else:
            return False
        with sock:
            sock.settimeout(2)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
    elif os.environ.get("AIMESH_TEST_DOCKER", "1") == "1" and _docker_answers():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(NATS_IMAGE, jetstream=True) as container:
            yield container.nats_uri()
    else:
        server = NatsServer(
            store_dir=tmp_path_factory.mktemp("nats"), http_port=None, max_payload=DEFAULT_NATS_MAX_PAYLOAD
        )
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def bus_max_payload(nats_url: str) -> int:
    """The session server's max_payload, as its INFO says at connect."""

    async def read() -> int:
        client = await nats.connect(nats_url)
        try:
            return client.max_payload
        finally:
            await client.close()

    return asyncio.run(read())


@pytest.fixture
def names(nats_url: str) -> Iterator[Names]:
    """A mesh prefix of this test's own; its streams (durable queues, events, KV buckets, object
    stores) are deleted afterwards, since JetStream reserves each stream's max_bytes on the server
    for as long as it exists (the events stream alone reserves 1 GiB)."""
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    yield names
    asyncio.run(delete_streams(nats_url, names.prefix))


async def delete_streams(nats_url: str, prefix: str) -> None:
    """Every stream whose name holds ``prefix`` (case aside: stream names are upper case,
    buckets keep the prefix's case), on a best-effort basis."""
    try:
        client = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=2)
    except Exception:
        return  # the test stopped the server, or it is gone: nothing left to reserve space
    try:
        js = client.jetstream()
        for info in await js.streams_info():
            if prefix.lower() in info.config.name.lower():
                await js.delete_stream(info.config.name)
    except Exception:
        pass
    finally:
        await client.close()


@pytest.fixture
def mesh_config(nats_url: str, names: Names) -> MeshConfig:
    return MeshConfig(nats_url=nats_url, prefix=names.prefix, drain_timeout_s=5.0)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
def spawn(nats_url: str, names: Names, tmp_path: Path) -> Iterator[object]:
    """spawn(module or argv, url=None, **env) -> a ServiceProcess on this test's mesh; killed
    at teardown."""
    procs: list[ServiceProcess] = []

    def start(target: str | list[str], url: str | None = None, **env: str) -> ServiceProcess:
        args = ["-m", target] if isinstance(target, str) else target
        proc = ServiceProcess(args, service_env(url or nats_url, names, **env), tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


@pytest.fixture
def fast(mesh_config: MeshConfig) -> MeshConfig:
    """This test's mesh, with metric snapshots every 0.2 s."""
    return msgspec.structs.replace(mesh_config, metrics_interval_s=0.2)


@pytest.fixture
def fast_metrics() -> MetricsConfig:
    """The metrics service on a free port, with ticks and queue reads every 0.2 s."""
    return MetricsConfig(port=0, scrape_interval_s=0.2, tick_s=0.2)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def otlp() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.handle)
    runner, url = await serve_app(app, "127.0.0.1", 0)
    yield receiver, url
    await runner.cleanup()
