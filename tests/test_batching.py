"""Dynamic batching (pure asyncio and numpy)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.inference.batching import DynamicBatcher


def doubling(x: np.ndarray) -> dict[str, np.ndarray]:
    if (x < 0).any():
        raise ValueError("negative input")
    return {"y": x * 2}


async def test_a_lone_request_is_served_at_once() -> None:
    batcher = DynamicBatcher(doubling, max_batch_size=32, max_wait_ms=500)
    batcher.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    out, size = await batcher.submit(np.array([[1.0, 2.0]]))
    assert loop.time() - start < 0.2  # nowhere near max_wait
    assert size == 1 and out["y"].tolist() == [[2.0, 4.0]]
    assert batcher.reasons["free"] == 1
    await batcher.stop()


async def test_requests_arriving_while_busy_share_a_forward_pass() -> None:
    gate = threading.Event()

    def slow(x: np.ndarray) -> dict[str, np.ndarray]:
        gate.wait(5)
        return doubling(x)

    batcher = DynamicBatcher(slow, max_batch_size=8, max_wait_ms=0)
    batcher.start()
    first = asyncio.create_task(batcher.submit(np.array([[0.0]])))
    await asyncio.sleep(0.05)  # the first forward is now running and blocked
    rest = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in range(1, 11)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(first, *rest)
    assert [r[0]["y"][0, 0] for r in results] == [2.0 * i for i in range(11)]
    assert sorted(batcher.sizes.elements()) == [1, 2, 8]  # 1 alone, then 8 (full), then the last 2
    assert batcher.reasons["full"] == 1
    await batcher.stop()


async def test_one_bad_request_never_fails_its_batch_mates() -> None:
    gate = threading.Event()

    def gated(x: np.ndarray) -> dict[str, np.ndarray]:
        gate.wait(5)
        return doubling(x)

    batcher = DynamicBatcher(gated, max_batch_size=8, max_wait_ms=0)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit(np.array([[0.0]])))
    await asyncio.sleep(0.05)
    good = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in (1, 2)]
    bad = asyncio.create_task(batcher.submit(np.array([[-1.0]])))
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    assert [(await g)[0]["y"][0, 0] for g in good] == [2.0, 4.0]
    with pytest.raises(ValueError, match="negative input"):
        await bad
    await batcher.stop()
