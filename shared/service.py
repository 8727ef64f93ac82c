"""The service base: one OS process hosting a few actors, with one lifecycle.

::

    CREATED ─start()─▶ STARTING ─▶ READY ─drain()─▶ DRAINING ─▶ STOPPED
                           └──────────── (error) ──────────────▶ FAILED

``start()`` connects to NATS (retrying until it is reachable), declares the service's streams
and buckets (:meth:`Service.setup`, idempotent), starts the actors, the discovery responder and
the health port, and only then reports ready.

``drain()`` shuts down in a fixed order:

1. readiness turns false;
2. intake stops: :meth:`Service.stop_intake` (e.g. an HTTP listener), then the service's owned
   tasks (below) are cancelled and awaited, then every actor unsubscribes / stops fetching, so
   new work goes to other instances;
3. work already accepted is finished, up to ``drain_timeout_s``; what is still running then is
   cancelled and logged with its count;
4. :meth:`Service.close_resources` releases the service's own dependencies;
5. discovery stops, spans are flushed, and the NATS connection drains (pending publishes and
   acks are flushed) and closes, last.

Both are idempotent.  A service is also an async context manager (start on enter, drain on
exit).

Background work has one owner: the service.  :meth:`Service.spawn` (a task that runs once),
:meth:`Service.watch` (:func:`shared.kv.follow` of a key range) and :meth:`Service.every` (a
timer) keep their tasks in one set, cancelled and awaited together at drain step 2, right after
:meth:`Service.stop_intake` (so nothing a task does races the release of resources at step 4);
a task spawned later (by a handler still finishing) is cancelled by a last sweep before NATS
drains.  Nothing is left running after :meth:`Service.drain`.

A task that raises (other than being cancelled) is logged once per failure with its name and
traceback.  Watchers and timers are meant to run forever: they are restarted after a back-off
that doubles per failure in a row (``task_backoff_s`` up to ``task_backoff_max_s``), and after
``task_failures_unready`` failures in a row the service reports not ready, with the task's name
in its status, until a run succeeds again (a watch re-established, a timer's step done).  A
one-shot task that raises turns the service not ready for good: it is a bug to fix.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ClassVar, Self

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared import __version__, tracing, transient
from shared.actor import Actor, ActorConfig, ActorCore, Call, Handler, Req
from shared.clock import rfc3339_from_ts
from shared.cluster import declare_stream, ensure_replicas
from shared.config import MeshConfig
from shared.connect import connect, wait_sent
from shared.discovery import Discovery
from shared.health import HealthServer
from shared.jsactor import JetStreamActor, JetStreamActorConfig
from shared.kv import follow
from shared.names import Names
from shared.schemas import ActorStats, GpuStats, RouteStats, ServiceStatus, StatusRequest
from shared.snapshots import SnapshotPublisher
from shared.spanexport import LoopPublisher

log = logging.getLogger(__name__)


class ServiceState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


TaskFn = Callable[[], Coroutine[Any, Any, None]]


class _Owned:
    """The failures in a row of one owned task (reset by :meth:`recovered`)."""

    def __init__(self, service: Service, name: str) -> None:
        self.service, self.name, self.failures = service, name, 0

    def recovered(self) -> None:
        if self.failures:
            self.failures = 0
            if self.service._failing.pop(self.name, None) is not None:
                log.info("%s: task %s recovered", self.service.name, self.name)


def new_instance_id() -> str:
    from nats.nuid import NUID

    return NUID().next().decode()


class Service:
    """Subclass, set ``name``, and override :meth:`setup` to add actors."""

    name: ClassVar[str] = "service"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = ""
    # Restarts of a failed watcher or timer: the delay doubles per failure in a row, up to the
    # maximum; after this many failures in a row the service reports not ready until it recovers.
    task_backoff_s: ClassVar[float] = 0.5
    task_backoff_max_s: ClassVar[float] = 10.0
    task_failures_unready: ClassVar[int] = 3

    def __init__(self, config: MeshConfig) -> None:
        """``config`` joins the mesh; a service with settings of its own takes them here too, as
        typed structs (their defaults when omitted), and builds its state here, not in setup."""
        self.config = config
        self.names = Names(config.prefix)
        self.instance_id = config.instance or new_instance_id()
        self.state = ServiceState.CREATED
        self.started_at = time.time()
        self._actors: list[ActorCore[Any]] = []
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._discovery: Discovery | None = None
        self._health: HealthServer | None = None
        self._snapshots: SnapshotPublisher | None = None
        self._spans_out: LoopPublisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._owned: dict[str, _Owned] = {}  # the restartable ones, by name
        self._failing: dict[str, str] = {}  # owned task's name → its last error, while failing
        self._lifecycle = asyncio.Lock()
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        """The service as its process runs it (:func:`shared.runner.run_service`): its own
        settings read from the config file and ``AIMESH_*`` variables (:mod:`shared.config`),
        which raise :class:`~shared.errors.ConfigError`.  The base has none: a service with
        settings overrides this and passes them to its constructor."""
        return cls(config)

    # -- hooks for subclasses ----------------------------------------------------------------
    async def setup(self) -> None:
        """Declare streams/buckets and add actors.  Runs once NATS is connected."""

    async def after_start(self) -> None:
        """Start background work that needs the whole service up (timers, watchers)."""

    async def stop_intake(self) -> None:
        """Stop taking new work from sources other than actors (an HTTP listener, timers)."""

    async def close_resources(self) -> None:
        """Release the service's own dependencies, after in-flight work finished."""

    def metadata(self) -> dict[str, str]:
        """Extra key/values for discovery (``aimesh status`` shows them)."""
        return {}

    def route_stats(self) -> list[RouteStats]:
        """Per-route counters for metric snapshots (the router's per model and version)."""
        return []

    def gpu_stats(self) -> list[GpuStats]:
        """GPU utilisation and memory for metric snapshots (services that have torch)."""
        return []

    # -- accessors -----------------------------------------------------------------------------
    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError(f"{self.name}: not connected; call start() first")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    @property
    def is_ready(self) -> bool:
        return self.state is ServiceState.READY and self._nc is not None and self._nc.is_connected and not self._failing

    @property
    def failing_tasks(self) -> dict[str, str]:
        """Owned tasks that keep failing (or failed for good), with their last error."""
        return dict(self._failing)

    # -- owned background tasks ----------------------------------------------------------------
    def spawn(self, name: str, coro_fn: TaskFn, *, restart: bool = False, backoff_s: float | None = None) -> None:
        """Run ``coro_fn()`` as a task the service owns (cancelled at drain step 2).  With
        ``restart`` it is run again after a back-off whenever it raises; without, a failure is
        logged and the service turns not ready (see the module's docstring)."""
        owned = _Owned(self, name)
        task = asyncio.get_running_loop().create_task(self._run_owned(owned, coro_fn, restart, backoff_s), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def watch(self, kv: KeyValue, keys: str, apply: Callable[[KeyValue.Entry], object], *, name: str) -> None:
        """Follow ``keys`` of ``kv`` (:func:`shared.kv.follow`) in an owned, restarted task."""

        async def run() -> None:
            await follow(kv, keys, apply, on_watching=lambda: self._recovered(name))

        self.spawn(name, run, restart=True)

    def every(self, interval_s: float, fn: Callable[[], Awaitable[None]], *, name: str) -> None:
        """Await ``fn()`` now and then ``interval_s`` after each run ends, in an owned task; a run
        that raises restarts the timer after a back-off (at least ``interval_s``)."""

        async def run() -> None:
            task = asyncio.current_task()
            while True:
                await fn()
                # Python 3.11's wait_for (inside fn, or nats-py) can swallow a cancellation that
                # lands as it completes: honour it here, or drain waits for a timer that goes on.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                self._recovered(name)
                await asyncio.sleep(interval_s)

        self.spawn(name, run, restart=True, backoff_s=max(interval_s, self.task_backoff_s))

    def _recovered(self, name: str) -> None:
        owned = self._owned.get(name)
        if owned is not None:
            owned.recovered()

    async def _run_owned(self, owned: _Owned, coro_fn: TaskFn, restart: bool, backoff_s: float | None) -> None:
        if restart:
            self._owned[owned.name] = owned
        try:
            while True:
                try:
                    await coro_fn()
                    return
                except Exception as exc:
                    owned.failures += 1
                    error = f"{type(exc).__name__}: {exc}"
                    if not restart:
                        self._failing[owned.name] = error
                        log.error("%s: task %s failed; not ready", self.name, owned.name, exc_info=True)
                        return
                    base = backoff_s or self.task_backoff_s
                    delay = min(base * 2 ** (owned.failures - 1), max(self.task_backoff_max_s, base))
                    if owned.failures >= self.task_failures_unready:
                        self._failing[owned.name] = error
                    log.error(
                        "%s: task %s failed (%d in a row%s); restarting in %.1fs",
                        self.name,
                        owned.name,
                        owned.failures,
                        "; not ready until it recovers" if owned.name in self._failing else "",
                        delay,
                        exc_info=True,
                    )
                    await asyncio.sleep(delay)
        finally:
            if self._owned.get(owned.name) is owned:
                del self._owned[owned.name]

    async def _cancel_tasks(self, rounds: int = 3, wait_s: float = 5.0) -> None:
        """Cancel every owned task and wait for them (including ones spawned meanwhile).  A task
        that swallows its cancellation is cancelled again, ``rounds`` times ``wait_s`` at most,
        then named in a warning and left behind: drain never waits forever."""
        for _ in range(rounds):
            if not self._tasks:
                return
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=wait_s)
        if self._tasks:
            names = ", ".join(sorted(t.get_name() for t in self._tasks))
            log.warning("%s: tasks still running after cancellation, left behind: %s", self.name, names)
            self._tasks.clear()

    @property
    def health_url(self) -> str | None:
        return self._health.url if self._health else None

    # -- building actors -------------------------------------------------------------------------
    def add_actor(self, config: ActorConfig, handler: Handler[Req], request_type: type[Req]) -> Actor[Req]:
        """A core-NATS actor; by default in the service's queue group, so instances share work,
        with the service's default limits (``MeshConfig.max_concurrency``/``mailbox_size``)."""
        config = msgspec.structs.replace(
            config,
            queue_group=self.names.queue_group(self.name) if config.queue_group is None else config.queue_group or None,
            max_concurrency=config.max_concurrency or self.config.max_concurrency,
            mailbox_size=self.config.mailbox_size if config.mailbox_size is None else config.mailbox_size,
        )
        actor: Actor[Req] = Actor(self.nc, config, handler, request_type)
        self._actors.append(actor)
        return actor

    def add_jetstream_actor(
        self, config: JetStreamActorConfig, handler: Handler[Req], request_type: type[Req]
    ) -> JetStreamActor[Req]:
        """A JetStream actor (:mod:`shared.jsactor`); its dead letters go to
        ``<prefix>.dlq.<name>``."""
        config = msgspec.structs.replace(config, max_concurrency=config.max_concurrency or self.config.max_concurrency)
        actor: JetStreamActor[Req] = JetStreamActor(
            self.js, config, handler, request_type, dead_letter_subject=self.names.dead_letter(config.name)
        )
        self._actors.append(actor)
        return actor

    async def retire_actor(self, actor: ActorCore[Any]) -> None:
        """Stop an actor at run time: no new messages, accepted ones finished (up to the drain
        timeout), then it is gone from discovery."""
        await actor.stop_intake()
        if not await actor.wait_idle(self.config.drain_timeout_s):
            await actor.cancel()
        if actor in self._actors:
            self._actors.remove(actor)

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or update it to ``config`` if it exists (idempotent).  An existing
        stream's replicas are raised to the configured count (data from a single server joining
        a cluster), never lowered (a host configured with fewer does not shrink the cluster's)."""
        await transient.retry_not_now(
            f"stream {config.name}", lambda: declare_stream(self.js, config, self.config.js_replicas)
        )

    async def ensure_kv(self, bucket: str, *, history: int = 1, ttl_s: float | None = None) -> KeyValue:
        """Open the bucket, creating it (with the configured replicas) if it does not exist."""
        return await transient.retry_not_now(f"bucket {bucket}", lambda: self._ensure_kv(bucket, history, ttl_s))

    async def _ensure_kv(self, bucket: str, history: int, ttl_s: float | None) -> KeyValue:
        try:
            kv = await self.js.key_value(bucket)
            await ensure_replicas(self.js, f"KV_{bucket}", self.config.js_replicas)
            return kv
        except (NotFoundError, BucketNotFoundError):
            config = KeyValueConfig(
                bucket=bucket, history=history, ttl=ttl_s, storage=StorageType.FILE, replicas=self.config.js_replicas
            )
            return await self.js.create_key_value(config)

    async def ensure_dead_letter_stream(self) -> None:
        await self.ensure_stream(
            StreamConfig(
                name=self.names.dead_letter_stream,
                subjects=[self.names.dead_letter("*")],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=7 * 24 * 3600,
            )
        )

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lifecycle:
            if self.state is not ServiceState.CREATED:
                return
            self.state = ServiceState.STARTING
            try:
                await self._start()
            except BaseException:
                self.state = ServiceState.FAILED
                await self._cancel_tasks()
                await self._detach_spans()
                await self._close_connection()
                raise
            self.state = ServiceState.READY
            self.ready.set()
            log.info("%s ready (instance %s, %d actors)", self.name, self.instance_id, len(self._actors))

    async def _start(self) -> None:
        tracing.setup_tracing(
            self.name,
            self.instance_id,
            self.version,
            self.config.prefix,
            self.config.trace_sample_ratio,
            to_mesh=self.config.trace_to_mesh,
        )
        self._nc = await connect(
            self.config,
            f"{self.config.prefix}-{self.name}-{self.instance_id}",
            role=self.name,
            error_cb=self._on_nats_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        if self.config.trace_to_mesh:
            # Spans to the metrics service (its dashboard's recent traces), from the span thread.
            self._spans_out = LoopPublisher(asyncio.get_running_loop(), self.nc.publish, self.names.spans(self.name))
            tracing.attach_mesh_exporter(self._spans_out)
        self.add_actor(
            ActorConfig(
                name="status",
                subject=self.names.service_status(self.name),
                template=self.names.endpoint_template("status"),
                max_concurrency=4,
                mailbox_size=64,
            ),
            self._status_handler,
            StatusRequest,
        )
        await self.setup()
        if self.config.health_port is not None:
            self._health = HealthServer(self.config.health_host, self.config.health_port, self._probe)
            await self._health.start()
        for actor in self._actors:
            await actor.start()
        self._discovery = Discovery(
            self.nc,
            name=self.names.micro_name(self.name),
            instance_id=self.instance_id,
            version=self.version,
            description=self.description,
            metadata=self._discovery_metadata,
            actors=self.actor_stats,
        )
        await self._discovery.start()
        self._snapshots = SnapshotPublisher(
            self.nc,
            subject=self.names.metrics(self.name, self.instance_id),
            service=self.name,
            instance=self.instance_id,
            interval_s=self.config.metrics_interval_s,
            state=lambda: self.state.value,
            actors=self.actor_stats,
            routes=self.route_stats,
            gpus=self.gpu_stats,
        )
        self._snapshots.start()
        await self.after_start()
        await wait_sent(self.nc)

    async def drain(self) -> None:
        async with self._lifecycle:
            if self.state in (ServiceState.STOPPED, ServiceState.CREATED):
                self.state = ServiceState.STOPPED
                self.stopped.set()
                return
            self.state = ServiceState.DRAINING
            self.ready.clear()
            timeout = self.config.drain_timeout_s
            log.info("%s draining (up to %gs for in-flight work)", self.name, timeout)
            try:
                await self._run_step("stop_intake", self.stop_intake)
                await self._cancel_tasks()
                for actor in self._actors:
                    await actor.stop_intake()
                deadline = time.monotonic() + timeout
                for actor in self._actors:
                    if not await actor.wait_idle(max(deadline - time.monotonic(), 0)):
                        cancelled = await actor.cancel()
                        log.error("%s: drain timed out; cancelled %d unfinished handlers", actor.name, cancelled)
                await self._run_step("close_resources", self.close_resources)
                if self._snapshots is not None:
                    await self._snapshots.stop()
                if self._discovery is not None:
                    await self._discovery.stop()
                if self._health is not None:
                    await self._health.stop()
            finally:
                await self._cancel_tasks()  # spawned after step 2, or left by a failed step
                await asyncio.to_thread(tracing.flush_tracing)
                await self._detach_spans()
                await self._close_connection()
                self.state = ServiceState.STOPPED
                self.stopped.set()
                log.info("%s stopped", self.name)

    async def aclose(self) -> None:
        await self.drain()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def _run_step(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception:
            log.exception("%s: %s failed during drain; continuing", self.name, what)

    async def _detach_spans(self) -> None:
        spans, self._spans_out = self._spans_out, None
        if spans is not None:
            await spans.wait_sent(2.0)
            tracing.detach_mesh_exporter(spans)

    async def _close_connection(self) -> None:
        nc, self._nc = self._nc, None
        self._js = None
        if nc is None or nc.is_closed:
            return
        try:
            await nc.drain()  # flushes pending publishes and acks
        except Exception as exc:
            # NATS is gone too (the whole mesh is stopping): nothing left to flush to.
            log.warning("NATS drain failed (%s); closing the connection", exc or type(exc).__name__)
            try:
                await nc.close()
            except Exception:
                log.debug("NATS close failed", exc_info=True)

    # -- status ----------------------------------------------------------------------------------
    def actor_stats(self) -> list[ActorStats]:
        return [a.stats() for a in self._actors]

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.name,
            instance_id=self.instance_id,
            version=self.version,
            state=self.state.value,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=rfc3339_from_ts(self.started_at),
            uptime_s=round(time.time() - self.started_at, 3),
            actors=self.actor_stats(),
            failing_tasks=self.failing_tasks,
        )

    async def _status_handler(self, _: StatusRequest, __: Call) -> ServiceStatus:
        return self.status()

    def _discovery_metadata(self) -> dict[str, str]:
        meta = {
            "mesh": self.config.prefix,
            "service": self.name,
            "state": self.state.value,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
        }
        if self._health is not None:
            meta["health"] = self._health.url
        if self._failing:
            meta["failing"] = ",".join(sorted(self._failing))
        meta.update(self.metadata())
        return meta

    def _probe(self) -> tuple[bool, bool, str]:
        alive = self.state is not ServiceState.FAILED
        state = self.state.value
        if self.state is ServiceState.READY and not self.is_ready:
            if self._nc is None or not self._nc.is_connected:
                state = "disconnected from NATS"
            elif self._failing:
                state = "failing tasks: " + ", ".join(sorted(self._failing))
            else:
                state = "not ready"
        return alive, self.is_ready, state

    # -- NATS callbacks --------------------------------------------------------------------------
    async def _on_nats_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self.state is ServiceState.READY:
            log.warning("disconnected from NATS; reconnecting (not ready meanwhile)")

    async def _on_reconnected(self) -> None:
        url = self._nc.connected_url.netloc if self._nc and self._nc.connected_url else "?"
        log.info("reconnected to NATS at %s", url)
