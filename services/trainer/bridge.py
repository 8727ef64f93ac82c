"""A NATS connection on its own event-loop thread, for the synchronous training process.

Training is a blocking torch loop; NATS is asyncio.  The bridge runs an event loop in a daemon
thread and lets the loop call coroutines there: ``call`` waits for the result (checkpoint
uploads, reading the dataset), ``post`` does not (progress reports must never slow a step).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from nats.aio.client import Client as NatsClient

from shared.config import MeshConfig
from shared.connect import connect

T = TypeVar("T")


class NatsBridge:
    def __init__(self, config: MeshConfig, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nats-bridge", daemon=True)
        self._thread.start()
        self._pending: set[Future[Any]] = set()
        self.nc: NatsClient = self.call(connect(config, name, role="trainer", max_backoff_s=1.0))

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def post(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coro`` on the bridge's loop and return at once (a future to wait on if needed)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def close(self) -> None:
        for future in list(self._pending):
            with contextlib.suppress(Exception):
                future.result(10)
        with contextlib.suppress(Exception):
            self.call(self.nc.drain(), timeout_s=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
