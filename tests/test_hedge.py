"""shared.hedge: a late answer is asked for again, within a budget, and the first answer wins;
and through a real router: a stopped worker's share of requests is answered by the other."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from shared.errors import BadRequest, MeshTimeout
from shared.hedge import Hedger, LatencyWindow, Responders
from shared.names import Names
from tests.helpers import ServiceProcess, eventually
from tests.mesh import deploy_digits, serving, start_gateway


class Workers:
    """Attempts that answer after ``delays`` in turn (the last one repeats); None: never."""

    def __init__(self, *delays: float | None) -> None:
        self.delays = list(delays)
        self.started = 0
        self.cancelled = 0

    async def attempt(self, _: int) -> int:
        n = self.started
        self.started += 1
        delay = self.delays[min(n, len(self.delays) - 1)]
        try:
            await asyncio.sleep(3600 if delay is None else delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return n


async def test_a_prompt_answer_is_not_hedged() -> None:
    hedger, workers = Hedger(max_delay_s=0.05), Workers(0.0)
    assert await hedger.run("m", workers.attempt) == 0
    assert workers.started == 1 and hedger.stats.hedged == 0


async def test_a_late_answer_is_asked_again_and_the_first_answer_wins() -> None:
    hedger, workers = Hedger(max_delay_s=0.05), Workers(None, 0.0)
    t0 = time.monotonic()
    assert await hedger.run("m", workers.attempt) == 1  # the hedge's answer
    assert 0.05 <= time.monotonic() - t0 < 1.0
    assert (hedger.stats.hedged, hedger.stats.won) == (1, 1)
    await asyncio.sleep(0)  # a cancelled task ends on the loop's next turn
    assert workers.cancelled == 1  # the stuck attempt is not left running


async def test_at_most_max_hedges_then_the_deadline_is_the_attempts_own() -> None:
    hedger, workers = Hedger(max_delay_s=0.02, max_hedges=2, budget=1.0), Workers(None, None, None, 0.0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(hedger.run("m", workers.attempt), 0.3)
    await asyncio.sleep(0)
    assert workers.started == 3 and workers.cancelled == 3


async def test_hedges_stay_within_the_budget() -> None:
    hedger = Hedger(max_delay_s=0.02, budget=0.1, burst=3.0)
    workers = Workers(*([None] * 30), 0.0)  # every first attempt hangs; hedges answer at once

    async def one() -> int | None:
        try:
            return await asyncio.wait_for(hedger.run("m", workers.attempt), 0.2)
        except TimeoutError:
            return None

    results = await asyncio.gather(*[one() for _ in range(30)])
    # Tokens: one to start with, 0.1 per request (at most 3 saved): 1 + 3 hedges for 30 requests.
    assert hedger.stats.hedged <= 4 and hedger.stats.skipped >= 26
    assert sum(r is not None for r in results) == hedger.stats.won


async def test_when_every_attempt_fails_the_error_is_raised() -> None:
    calls = 0

    async def refused(_: int) -> int:
        nonlocal calls
        calls += 1
        raise BadRequest("no")

    with pytest.raises(BadRequest):
        await Hedger(max_delay_s=0.01).run("m", refused)
    assert calls == 1  # a prompt error is not late: not hedged

    async def slow_timeout(_: int) -> int:
        await asyncio.sleep(0.05)
        raise MeshTimeout("aimesh.infer.m.1", 0.05)

    with pytest.raises(MeshTimeout):
        await Hedger(max_delay_s=0.01, budget=1.0).run("m", slow_timeout)


async def test_the_delay_follows_the_targets_p95() -> None:
    hedger = Hedger(min_delay_s=0.001, max_delay_s=1.0)
    assert hedger.delay_s("m") == 1.0  # unknown yet: the ceiling
    for _ in range(64):
        await hedger.run("m", Workers(0.002).attempt)
    assert 0.002 <= hedger.delay_s("m") < 0.1
    assert hedger.delay_s("other") == 1.0

    window = LatencyWindow(quantile=0.95, size=100, every=100)
    for ms in range(100):
        window.observe(ms / 1000)
    assert window.value == pytest.approx(0.095)


async def test_hedged_answers_do_not_raise_the_delay() -> None:
    """A worker that never answers first attempts, hedges answered in 2 ms: the delay follows the
    answers' own latency (about 2 ms), not the first send's (the delay plus 2 ms, growing)."""
    hedger = Hedger(min_delay_s=0.001, max_delay_s=0.05, budget=1.0)
    for _ in range(64):
        assert await hedger.run("m", Workers(None, 0.002).attempt) == 1
    assert hedger.delay_s("m") < 0.02


async def test_hedging_off_is_one_attempt() -> None:
    hedger, workers = Hedger(budget=0, max_delay_s=0.01), Workers(0.05)
    assert await hedger.run("m", workers.attempt) == 0 and workers.started == 1


def test_hedges_go_to_the_workers_that_answered_last() -> None:
    responders = Responders(keep=2)
    assert responders.pick("m", "1", 1) is None
    for worker in ("a", "b", "a", "c"):
        responders.answered("m", "1", worker)
    assert [responders.pick("m", "1", n) for n in (1, 2, 3)] == ["c", "a", None]  # "b" aged out
    assert responders.pick("m", "2", 1) is None


def test_while_a_stall_is_suspected_first_attempts_go_to_fresh_responders() -> None:
    responders = Responders(suspect_s=60, fresh_s=0.05)
    responders.answered("m", "1", "stalled")
    time.sleep(0.06)  # it answers no more
    responders.answered("m", "1", "healthy")
    assert responders.first("m", "1") is None  # nothing suspected: the queue group picks
    responders.suspect("m", "1")
    assert {responders.first("m", "1") for _ in range(20)} == {"healthy"}
    assert responders.first("m", "2") is None
    time.sleep(0.06)
    assert responders.first("m", "1") is None  # none fresh: the queue group again


def test_while_a_stall_is_suspected_first_attempts_spread_over_every_fresh_worker() -> None:
    """Sixteen workers answering: none is left out (a short memory of 8 once halved capacity)."""
    responders = Responders(suspect_s=60)
    workers = [f"w{i}" for i in range(16)]
    for worker in workers:
        responders.answered("m", "1", worker)
    responders.suspect("m", "1")
    assert {responders.first("m", "1") for _ in range(2000)} == set(workers)


# -- through a real router and two workers ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("hedge_budget", ["0.5", "0"])
async def test_a_stopped_workers_requests_are_answered_by_the_other(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, hedge_budget: str
) -> None:
    """SIGSTOP one of two workers: without hedging, the requests the queue group gives it wait
    for their deadline (504); with it, each is answered by the other worker within its p95."""
    stopped, _, base = await start_gateway(
        spawn, nats_url, names, router_env={"AIMESH_ROUTER_HEDGE_BUDGET": hedge_budget}
    )
    second = spawn("services.inference")
    await deploy_digits(nc, names)
    await eventually(lambda: _both_serve(nc, names), 60, "both workers to serve digits@1")
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    headers = {"Aimesh-Timeout-Ms": "3000"}

    async def one(http: aiohttp.ClientSession) -> tuple[int, float]:
        t0 = time.monotonic()
        async with http.post(f"{base}/v2/models/digits/infer", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status, time.monotonic() - t0

    async with aiohttp.ClientSession() as http:
        for _ in range(100):  # the router learns the version's latency
            assert (await one(http))[0] == 200
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        try:
            results = [await one(http) for _ in range(30)]
        finally:
            os.kill(stopped.proc.pid, signal.SIGCONT)
    statuses = [s for s, _ in results]
    slowest = max(t for _, t in results)
    if hedge_budget == "0":  # the queue group keeps giving the stopped worker its share
        assert 504 in statuses, statuses
    else:
        assert statuses == [200] * 30, statuses
        assert slowest < 1.5, f"the slowest request took {slowest:.2f} s"
    assert second.proc.poll() is None


async def _both_serve(nc: NatsClient, names: Names) -> bool:
    from shared.discovery import discover
    from shared.schemas import MicroPing

    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
    return len(pings) == 2 and await serving(nc, names, "digits@1")
