"""A service's owned background tasks (spawn, watch, every) against a real nats-server: failures
are logged and restarted or reported, and drain leaves nothing running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from shared.config import MeshConfig
from shared.kv import open_bucket
from shared.names import Names
from shared.service import Service
from tests.helpers import eventually


def started_since(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks started after ``before`` that are still running (the test's own excepted)."""
    return {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}


def from_a_library(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "site-packages" in code.co_filename


class Tasks(Service):
    """A service whose after_start runs what the test hands it."""

    name = "tasks"
    task_backoff_s = 0.05
    task_backoff_max_s = 0.2
    task_failures_unready = 3

    def __init__(self, config: MeshConfig, start_tasks: Callable[[Tasks], None]) -> None:
        super().__init__(config)
        self.start_tasks = start_tasks
        self.late: Callable[[], Awaitable[None]] | None = None

    async def after_start(self) -> None:
        self.start_tasks(self)

    async def close_resources(self) -> None:
        if self.late is not None:  # spawned after drain step 2: the last sweep cancels it
            self.spawn("late", self.late)


def failures_logged(caplog: pytest.LogCaptureFixture, task: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"task {task} failed" in r.getMessage()]


async def test_a_timer_that_raises_once_is_logged_and_restarted(
    mesh_config: MeshConfig, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    async def step() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            raise RuntimeError("one bad tick")

    service = Tasks(mesh_config, lambda s: s.every(0.01, step, name="tick"))
    async with service:
        await eventually(lambda: asyncio.sleep(0, runs >= 5), 10, "the timer to run again after its failure")
        assert service.is_ready
        assert service.status().failing_tasks == {}
    [record] = failures_logged(caplog, "tick")
    assert record.exc_info is not None and "one bad tick" in str(record.exc_info[1])
    assert "restarting" in record.getMessage()


async def test_a_watcher_that_keeps_failing_turns_the_service_not_ready_until_it_recovers(
    mesh_config: MeshConfig, nc: NatsClient, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    bucket = f"{names.prefix}-tasks"
    kv = await open_bucket(js, bucket, create=True)
    assert kv is not None
    await js.delete_key_value(bucket)  # the watch cannot be set up: every run fails
    seen: list[str] = []

    def apply(entry: KeyValue.Entry) -> None:
        seen.append(entry.key)

    service = Tasks(mesh_config, lambda s: s.watch(kv, "deploy.>", apply, name="deployments"))
    async with service:
        await eventually(lambda: asyncio.sleep(0, not service.is_ready), 10, "readiness to drop")
        assert list(service.status().failing_tasks) == ["deployments"]
        assert service._discovery_metadata()["failing"] == "deployments"
        assert service._probe() == (True, False, "failing tasks: deployments")
        assert len(failures_logged(caplog, "deployments")) >= 3

        await open_bucket(js, bucket, create=True)  # back: the restarted watch follows it
        await kv.put("deploy.a", b"1")
        await eventually(lambda: asyncio.sleep(0, seen == ["deploy.a"]), 10, "the watcher to recover")
        assert service.is_ready
        assert service.status().failing_tasks == {}
    await js.delete_key_value(bucket)


async def test_a_one_shot_task_that_raises_turns_the_service_not_ready(
    mesh_config: MeshConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async def load() -> None:
        raise ValueError("no such model")

    service = Tasks(mesh_config, lambda s: s.spawn("load", load))
    async with service:
        await eventually(lambda: asyncio.sleep(0, not service.is_ready), 10, "readiness to drop")
        assert service.status().failing_tasks == {"load": "ValueError: no such model"}
        [record] = failures_logged(caplog, "load")
        assert record.exc_info is not None


async def test_drain_cancels_every_owned_task_and_leaves_none(
    mesh_config: MeshConfig, nc: NatsClient, names: Names
) -> None:
    js = nc.jetstream()
    kv = await open_bucket(js, f"{names.prefix}-tasks", create=True)
    assert kv is not None
    cancelled: set[str] = set()

    def forever(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.add(name)
                raise

        return run

    def start(s: Tasks) -> None:
        s.spawn("sleeper", forever("sleeper"))
        s.watch(kv, "deploy.>", lambda _: None, name="watcher")
        s.every(3600, forever("timer"), name="timer")

    service = Tasks(mesh_config, start)
    service.late = forever("late")
    before = asyncio.all_tasks()
    await service.start()
    await eventually(lambda: asyncio.sleep(0, len(service._tasks) == 3), 10, "three owned tasks")
    owned = set(service._tasks)
    await service.drain()
    assert cancelled == {"sleeper", "timer", "late"}
    assert all(t.cancelled() for t in owned)
    assert not service._tasks
    # Ours must all be gone now.  nats-py's own helpers (an ordered consumer's heartbeat check, its
    # re-subscribe after a missed heartbeat under load) are cancelled by the watcher's stop and end
    # on their next turn of the loop: give them that turn, but never count them as ours.
    assert not {t for t in started_since(before) if not from_a_library(t)}
    await eventually(lambda: asyncio.sleep(0, not started_since(before)), 5, "nats-py's watcher tasks to end")
    await js.delete_key_value(f"{names.prefix}-tasks")
