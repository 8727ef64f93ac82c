"""Test helpers: service processes, waiting on conditions with a deadline, free ports, the CLI's
command and environment, raw HTTP requests and error-body checks.  Mesh set-ups (models,
gateways) live in ``tests/mesh.py``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import nats
import pytest
from yarl import URL

from shared.discovery import discover
from shared.names import Names
from shared.schemas import MicroPing

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
AIMESH = [sys.executable, "-m", "aimesh"]


async def holds(value: bool) -> bool:
    """A condition already known, as the awaitable ``eventually`` re-checks: ``lambda: holds(x in seen)``."""
    return value


async def eventually(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Re-run ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


# JetStream reserves a stream's max_bytes on the server when the stream is made: the suite runs
# hundreds of meshes (prefixes) on one server, so each gets small durable streams (at 40 MiB the
# session server ran out of JetStream storage part-way through the suite).  Messages over them are
# a 413 (tests/test_large_bodies.py).
TEST_STREAM_LIMITS = {
    "AIMESH_DURABLE_REQUESTS_MAX_BYTES": str(16 * 1024 * 1024),
    "AIMESH_DURABLE_RESULTS_MAX_BYTES": str(16 * 1024 * 1024),
}


def service_env(nats_url: str, names: Names, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "OTEL_"))}
    env.update({"AIMESH_NATS_URL": nats_url, "AIMESH_PREFIX": names.prefix, "PYTHONPATH": str(ROOT)})
    env.update(TEST_STREAM_LIMITS)
    env.setdefault("OTEL_SDK_DISABLED", "true")
    env.update(extra)
    return env


class ServiceProcess:
    """``python <args>`` (e.g. ``-m tests.apps.echo``) as a child process, its output kept for
    failure messages."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.module = " ".join(args)
        self.log_path = log_dir / f"proc-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *args], env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, nats_url: str, micro_name: str, timeout_s: float = 20.0) -> MicroPing:
        nc = await nats.connect(nats_url)
        try:

            async def found() -> MicroPing | None:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.module} exited with {self.proc.returncode}:\n{self.output()}")
                for ping in await discover(nc, "PING", MicroPing, name=micro_name, wait_s=0.3):
                    if ping.metadata.get("pid") == str(self.pid) and ping.metadata.get("state") == "ready":
                        return ping
                return None

            return await eventually(found, timeout_s, f"{self.module} to be ready")
        finally:
            await nc.close()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def require_binary(name: str, package: str | None = None) -> str:
    """The path of ``name``; a skip without it, or a failure in CI, where it must be installed."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI and is not on PATH: `make sysdeps` (as root) installs it")
    pytest.skip(
        f"no {name} on PATH: install Debian's {package or name} package (`make sysdeps` as root) to run this test"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the mesh's, telemetry's and NATS's settings, for the
    ``aimesh`` command line (``AIMESH``) run as an operator would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "OTEL_", "NATS_"))}
    env.update(PYTHONPATH=str(ROOT), OTEL_SDK_DISABLED="true", **extra)
    return env


async def send(
    http: aiohttp.ClientSession,
    method: str,
    base: str,
    path: str,
    *,
    json: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    """One request with the path sent exactly as written; (status, JSON body, headers)."""
    url = URL(base + path, encoded=True)
    async with http.request(method, url, json=json, data=data, headers=headers) as resp:
        assert resp.content_type == "application/json", (method, path, resp.status, await resp.text())
        return resp.status, await resp.json(), resp.headers


def oip_error(status: int, body: Any, want: int, *, contains: str = "") -> None:
    """``status`` is ``want`` and ``body`` an Open Inference Protocol error holding ``contains``."""
    assert status == want, body
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    assert contains in body["error"], body
