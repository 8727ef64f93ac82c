"""Dynamic batching (pure asyncio and numpy).

The forward passes here block on a gate the test opens, so which requests share a pass is decided
by what is queued while a pass runs, never by how fast the machine is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from services.inference.batching import DynamicBatcher
from shared.errors import Overloaded
from tests.helpers import eventually

Forward = Callable[[np.ndarray], dict[str, np.ndarray]]


def doubling(x: np.ndarray) -> dict[str, np.ndarray]:
    if (x < 0).any():
        raise ValueError("negative input")
    return {"y": x * 2}


class Gate:
    """A forward pass that blocks until the test opens the gate; ``started`` is set once a pass
    is running (and blocked)."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.started = threading.Event()
        self.opened = threading.Event()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.started.set()
        if not self.opened.wait(30):
            raise TimeoutError("the test never opened the gate")
        return self.forward(x)

    async def wait_started(self) -> None:
        if not await asyncio.to_thread(self.started.wait, 10):
            raise AssertionError("the first forward pass never started")


async def wait_queued(batcher: DynamicBatcher, n: int) -> None:
    async def queued() -> bool:
        return batcher.queued == n

    await eventually(queued, 10, f"{n} requests queued behind the running forward pass")


async def test_a_lone_request_is_served_at_once() -> None:
    # max_wait is an hour: had the lone request waited for company, wait_for would fail.
    batcher = DynamicBatcher(doubling, max_batch_size=32, max_wait_ms=3_600_000)
    batcher.start()
    out, size = await asyncio.wait_for(batcher.submit(np.array([[1.0, 2.0]])), timeout=30)
    assert size == 1 and out["y"].tolist() == [[2.0, 4.0]]
    assert batcher.reasons == {"free": 1}  # released because the model was free, not by a timer
    await batcher.stop()


async def test_requests_arriving_while_busy_share_a_forward_pass() -> None:
    gate = Gate(doubling)
    batcher = DynamicBatcher(gate, max_batch_size=8, max_wait_ms=0)
    batcher.start()
    first = asyncio.create_task(batcher.submit(np.array([[0.0]])))
    await gate.wait_started()  # the first forward is now running and blocked
    rest = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in range(1, 11)]
    await wait_queued(batcher, 10)
    gate.opened.set()
    results = await asyncio.gather(first, *rest)
    assert [r[0]["y"][0, 0] for r in results] == [2.0 * i for i in range(11)]
    assert [r[1] for r in results] == [1] + [8] * 8 + [2] * 2  # each reply says how many shared its pass
    assert sorted(batcher.sizes.elements()) == [1, 2, 8]  # 1 alone, then 8 (full), then the last 2
    assert batcher.reasons == {"free": 2, "full": 1}
    await batcher.stop()


async def test_one_bad_request_never_fails_its_batch_mates() -> None:
    gate = Gate(doubling)
    batcher = DynamicBatcher(gate, max_batch_size=8, max_wait_ms=0)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit(np.array([[0.0]])))
    await gate.wait_started()
    good = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in (1, 2)]
    bad = asyncio.create_task(batcher.submit(np.array([[-1.0]])))
    await wait_queued(batcher, 3)
    gate.opened.set()
    await blocker
    assert [(await g)[0]["y"][0, 0] for g in good] == [2.0, 4.0]
    with pytest.raises(ValueError, match="negative input"):
        await bad
    # They did share a pass (3 rows, which failed), then each was retried alone.
    assert sorted(batcher.sizes.elements()) == [1, 1, 1, 1, 3]
    await batcher.stop()


async def test_a_full_batch_queue_refuses_with_the_numbers() -> None:
    gate = Gate(doubling)
    batcher = DynamicBatcher(gate, max_batch_size=8, max_wait_ms=0, max_queued=2)
    batcher.start()
    first = asyncio.create_task(batcher.submit(np.array([[0.0]])))
    await gate.wait_started()  # the first pass runs: what follows waits in the queue
    queued = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in (1, 2)]
    await wait_queued(batcher, 2)
    with pytest.raises(Overloaded, match=r"batch queue full \(2 waiting, limit 2\)"):
        await batcher.submit(np.array([[3.0]]))
    gate.opened.set()
    assert [(await t)[0]["y"][0, 0] for t in (first, *queued)] == [0.0, 2.0, 4.0]
    await batcher.stop()
