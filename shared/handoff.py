"""A bounded hand-off from a producer thread to the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """At most ``limit`` items wait between a thread that produces them and the coroutine that
    reads them.  The thread takes a slot per item (blocking on a semaphore, never on the event
    loop) and gives up once the reader has closed, so a stalled or failed reader never leaves the
    thread blocked, nor its items piling up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._slots = threading.Semaphore(limit)
        self._closed = threading.Event()

    def put(self, item: T) -> bool:
        """From the producer thread: hand ``item`` over, waiting for a slot; False once the
        reader has closed (the producer should stop)."""
        while not self._slots.acquire(timeout=0.1):
            if self._closed.is_set():
                return False
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        return True

    async def get(self) -> T:
        """On the loop: the next item, freeing its slot."""
        item = await self._queue.get()
        self._slots.release()
        return item

    def close(self) -> None:
        """The reader is done: a producer waiting for a slot gives up."""
        self._closed.set()
