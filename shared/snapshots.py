"""Metric snapshots: every service publishes its counters on ``<prefix>.metrics.<service>.<instance>``.

A snapshot is cumulative (counters since the process started, gauges as of now), so a lost or
late snapshot costs resolution, never correctness: the metrics service takes differences
between the snapshots it did get.  Publishing is a core NATS publish on a timer, off the request
path, one message per interval whatever the traffic.

What goes in: process CPU seconds and resident memory (psutil), GPU utilisation and memory when
the service reports them (``gpu_stats``, from services that have torch), every actor's counters
(:class:`ActorStats`, with labels such as model and version) and, for the router, per-route
counters (:class:`RouteStats`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

import msgspec
import psutil
from nats.aio.client import Client as NatsClient

from shared.schemas import ActorStats, GpuStats, MetricsSnapshot, ProcessStats, RouteStats

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()


def process_stats(proc: psutil.Process) -> ProcessStats:
    with proc.oneshot():
        cpu = proc.cpu_times()
        return ProcessStats(cpu_s=cpu.user + cpu.system, rss_bytes=proc.memory_info().rss, threads=proc.num_threads())


class SnapshotPublisher:
    """Publishes one :class:`MetricsSnapshot` every ``interval_s`` until stopped."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        subject: str,
        service: str,
        instance: str,
        interval_s: float,
        state: Callable[[], str],
        actors: Callable[[], Sequence[ActorStats]],
        routes: Callable[[], Sequence[RouteStats]] = lambda: (),
        gpus: Callable[[], Sequence[GpuStats]] = lambda: (),
    ) -> None:
        self._nc = nc
        self.subject = subject
        self.service = service
        self.instance = instance
        self.interval_s = interval_s
        self._state = state
        self._actors = actors
        self._routes = routes
        self._gpus = gpus
        self._proc = psutil.Process()
        self._host = socket.gethostname()
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    def snapshot(self, state: str | None = None) -> MetricsSnapshot:
        return MetricsSnapshot(
            service=self.service,
            instance=self.instance,
            host=self._host,
            pid=os.getpid(),
            ts=time.time(),
            interval_s=self.interval_s,
            state=state or self._state(),
            process=process_stats(self._proc),
            gpus=list(self._gpus()),
            actors=list(self._actors()),
            routes=list(self._routes()),
        )

    async def publish(self, state: str | None = None) -> None:
        await self._nc.publish(self.subject, _encoder.encode(self.snapshot(state)))
        self.published += 1

    def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-snapshots")

    async def stop(self) -> None:
        """Stop the timer and publish a last snapshot, marked ``stopped``: the final counts, and
        the metrics service forgets the instance at once."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await self.publish(state="stopped")
        except Exception:
            log.debug("last metrics snapshot not sent", exc_info=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception:  # disconnected: the next tick tries again; counters are cumulative
                log.debug("metrics snapshot not sent", exc_info=True)
            await asyncio.sleep(self.interval_s)
