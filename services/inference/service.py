"""Wiring of an inference worker.

- ``<prefix>.inference.deploy`` (request/reply): resolve ``MODEL[@VERSION|@ALIAS]`` in the
  registry and record the deployment in ``<prefix>-deployments``.
- Every worker watches the deployments: it loads each version's weights in a worker thread and
  only then subscribes to ``<prefix>.infer.<model>.<version>`` in that version's queue group, so
  more workers mean more throughput with no other change, and a worker that has not loaded a
  version (or cannot) takes none of its requests: that version is not ready (its OIP ready
  endpoint answers 503), and the worker's discovery metadata says why under ``failed``.
- A deployment moved to another version is loaded in the background; the new subject is served
  before the old one is drained and dropped, so no request fails during the swap.  What to
  load, update and retire is decided by ``deployments.reconcile`` (pure); this module applies it.
- Every worker listens on ``<prefix>.cancel.generate.*`` (no queue group: whichever worker runs a
  generation hears it): a cancel sets that generation's event, and its thread stops before the
  next token, freeing the generation slot (the router sends it when its HTTP client is gone).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.inference import generate
from services.inference.batching import DynamicBatcher
from services.inference.deployments import check_deploy, previous_version, reconcile
from services.inference.model import LoadedModel
from shared import durable
from shared.actor import Actor, ActorConfig, Call
from shared.clock import rfc3339_now
from shared.config import DurableConfig, InferenceConfig, MeshConfig, load_durable_config, load_inference_config
from shared.errors import BadRequest, NotFound, ServiceError
from shared.handoff import Handoff
from shared.jsactor import JetStreamActorConfig
from shared.names import deploy_key, deploy_keys
from shared.registry import artifacts, get_version, registry_kv
from shared.schemas import (
    Deployment,
    DeployRequest,
    DurableResult,
    GenerateChunk,
    GenerateRequest,
    GpuStats,
    InferReply,
    InferRequest,
)
from shared.service import Service
from shared.tensors import from_wire, to_wire
from zoo.devices import device_stats
from zoo.spec import check_factory, check_kwargs

log = logging.getLogger(__name__)
_deployment = msgspec.json.Decoder(Deployment)
_json = msgspec.json.Encoder()
DURABLE_MAX_DELIVER = 5
# Cancels that arrived before their generation started (still in a mailbox): remembered, bounded.
EARLY_CANCELS = 1024
GENERATION_AHEAD = 16  # pieces a generation thread may run ahead of the publisher


@dataclass
class Served:
    deployment: Deployment
    model: LoadedModel
    batcher: DynamicBatcher
    actors: list[Actor[Any]]


class InferenceService(Service):
    name = "inference"
    description = "Serves model versions from the registry on request queues, with dynamic batching."

    deployments: KeyValue

    def __init__(
        self, config: MeshConfig, inference: InferenceConfig | None = None, durable: DurableConfig | None = None
    ) -> None:
        super().__init__(config)
        self.inference_config = inference or InferenceConfig()
        self.durable_config = durable or DurableConfig()
        # State is whole from the start: a drain after a failed setup() finds nothing half-made.
        self._records: dict[str, Deployment] = {}  # by deployments-bucket key
        self._served: dict[str, Served] = {}  # by model@version
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._generators = ThreadPoolExecutor(max_workers=2, thread_name_prefix="generate")
        # Generations running here, by id (one id may name several: a cancel stops them all).
        self._generations: dict[str, list[threading.Event]] = {}
        self._early_cancels: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        return cls(config, load_inference_config(env), load_durable_config(env))

    async def setup(self) -> None:
        self.deployments = await self.ensure_kv(self.names.deployments_bucket)
        for config in durable.stream_configs(self.names, self.durable_config):
            await self.ensure_stream(config)
        await self.ensure_kv(self.names.registry_bucket)
        self.add_actor(
            ActorConfig(name="deploy", subject=self.names.deploy, max_concurrency=4), self.deploy, DeployRequest
        )
        await self.nc.subscribe(self.names.generate_cancel_subjects, cb=self._on_cancel)

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[1]
        events = self._generations.get(request_id)
        if events:
            for event in events:
                event.set()
            return
        self._early_cancels[request_id] = None
        while len(self._early_cancels) > EARLY_CANCELS:
            self._early_cancels.popitem(last=False)

    def _start_generation(self, request_id: str) -> threading.Event:
        event = threading.Event()
        if request_id in self._early_cancels:  # cancelled while it waited in the mailbox
            del self._early_cancels[request_id]
            event.set()
        self._generations.setdefault(request_id, []).append(event)
        return event

    def _end_generation(self, request_id: str, event: threading.Event) -> None:
        event.set()  # whatever ended the handler, its thread stops before the next token
        events = self._generations.get(request_id, [])
        if event in events:
            events.remove(event)
        if not events:
            self._generations.pop(request_id, None)

    async def after_start(self) -> None:
        self.watch(self.deployments, deploy_keys(), self._on_record, name="deployments")

    async def close_resources(self) -> None:
        for served in self._served.values():
            await served.batcher.stop()
        self._executor.shutdown(wait=False)
        self._generators.shutdown(wait=False)

    @property
    def is_ready(self) -> bool:
        return super().is_ready and not self._loading

    def gpu_stats(self) -> list[GpuStats]:
        return device_stats()

    def metadata(self) -> dict[str, str]:
        meta = {"serving": ",".join(sorted(self._served))}
        if self._failed:
            meta["failed"] = "; ".join(f"{m}: {why}" for m, why in sorted(self._failed.items()))
        return meta

    # -- deploy ----------------------------------------------------------------------------------
    async def deploy(self, req: DeployRequest, _: Call) -> Deployment:
        check_deploy(req)
        try:
            version = await get_version(await registry_kv(self.js, self.names), req.model, req.ref)
        except NotFound as exc:
            raise BadRequest(exc.description) from None
        # Refused here as at load time: a version no worker would build is not deployed at all.
        check_factory(version.factory, self.config.model_packages)
        check_kwargs(version.kwargs)
        key = deploy_key(req.model, req.ref)
        try:
            before: Deployment | None = _deployment.decode((await self.deployments.get(key)).value or b"")
        except KeyNotFoundError:
            before = None
        deployment = Deployment(
            previous=previous_version(before, version.version),
            model=req.model,
            ref=req.ref,
            version=version.version,
            replicas=req.replicas,
            max_batch_size=req.max_batch_size,
            max_wait_ms=req.max_wait_ms,
            updated_at=rfc3339_now(),
        )
        await self.deployments.put(key, _json.encode(deployment))
        return deployment

    async def _durable_actor(self, deployment: Deployment, model: LoadedModel, batcher: DynamicBatcher) -> Any:
        """Durable requests for this version: acked only once their result is stored, so a
        request whose worker dies is served again by another; a bad request's result is its error."""

        async def handle(req: InferRequest, call: Call) -> None:
            deliveries = call.msg.metadata.num_delivered or 1
            try:
                rows = model.check({name: from_wire(t, name) for name, t in req.inputs.items()})
                outputs, _ = await batcher.submit(rows)
                result = DurableResult(
                    id=req.id,
                    state="done",
                    model=deployment.model,
                    version=deployment.version,
                    outputs={k: to_wire(v) for k, v in outputs.items()},
                )
            except ServiceError as err:
                if err.code >= 500 and deliveries < DURABLE_MAX_DELIVER:
                    raise
                result = DurableResult(
                    id=req.id,
                    state="error",
                    model=deployment.model,
                    version=deployment.version,
                    error=err.description,
                    code=err.code,
                )
            except Exception as exc:
                if deliveries < DURABLE_MAX_DELIVER:
                    raise
                result = DurableResult(
                    id=req.id,
                    state="error",
                    model=deployment.model,
                    version=deployment.version,
                    error=f"internal error ({type(exc).__name__})",
                    code=500,
                )
            await durable.store_result(self.js, self.names, result)

        actor = self.add_jetstream_actor(
            JetStreamActorConfig(
                name=f"durable-{deployment.model}-{deployment.version}",
                stream=self.names.requests_stream,
                subject=self.names.durable_request(deployment.model, deployment.version),
                durable=f"infer-{deployment.model}-{deployment.version}",
                template=self.names.durable_template(),
                max_concurrency=max(64, deployment.max_batch_size * 4),
                max_deliver=DURABLE_MAX_DELIVER,
                ack_wait_s=self.inference_config.durable_ack_wait_s,
                retry_backoff_s=0.5,
                labels={"model": deployment.model, "version": deployment.version},
            ),
            handle,
            InferRequest,
        )
        await actor.start()
        return actor

    async def _generation_actor(self, deployment: Deployment, model: LoadedModel) -> Actor[GenerateRequest]:
        """Token streaming: each request's chunks go to its reply subject as they are made; the
        handler's own reply is the last chunk (``done``).  Generation runs on its own threads, so
        a long generation never holds up the batched forward passes."""

        counts = {"generating": 0, "cancelled": 0}

        async def handle(req: GenerateRequest, call: Call) -> GenerateChunk:
            generate.check(req, getattr(model.module, "context", 0))
            if not call.msg.reply:
                raise BadRequest("generation streams its reply: send a request, not a publish")
            request_id = req.id or uuid.uuid4().hex
            cancel = self._start_generation(request_id)
            counts["generating"] += 1
            try:
                index, last = await self._stream_pieces(req, model, cancel, call.msg.reply, deployment)
            finally:
                counts["generating"] -= 1
                self._end_generation(request_id, cancel)
            if last.finish_reason == "cancelled":
                counts["cancelled"] += 1
                log.info("generation %s on %s@%s cancelled", request_id, deployment.model, deployment.version)
            return GenerateChunk(
                text=last.text if last.finish_reason else "",
                index=index,
                done=True,
                finish_reason=last.finish_reason or "length",
                prompt_tokens=len(req.prompt.encode()),
                completion_tokens=last.tokens,
                model=deployment.model,
                version=deployment.version,
            )

        actor = self.add_actor(
            ActorConfig(
                name=f"generate-{deployment.model}-{deployment.version}",
                subject=self.names.generate(deployment.model, deployment.version),
                template=self.names.generate_template(),
                queue_group=self.names.infer_queue_group(deployment.model, deployment.version),
                max_concurrency=8,
                mailbox_size=64,
                labels={"model": deployment.model, "version": deployment.version},
            ),
            handle,
            GenerateRequest,
        )
        actor.extra_stats = lambda: dict(counts)
        await actor.start()
        return actor

    async def _stream_pieces(
        self, req: GenerateRequest, model: LoadedModel, cancel: threading.Event, reply: str, deployment: Deployment
    ) -> tuple[int, generate.Piece]:
        """Run the generation on a generator thread, publishing each piece to ``reply``; returns
        the number of chunks sent and the last piece (its finish reason)."""
        loop = asyncio.get_running_loop()
        ahead: Handoff[generate.Piece | BaseException | None] = Handoff(loop, GENERATION_AHEAD)

        def produce() -> None:
            try:
                for piece in generate.pieces(model.module, req, cancel):
                    if not ahead.put(piece):
                        return  # the reader has gone
                ahead.put(None)
            except BaseException as exc:
                ahead.put(exc)

        # Threads: the executor's two generator threads; generations waiting for one are bounded
        # by the generate actor's concurrency (8 per version).  The thread ends with the
        # generation, so its future need not be kept.
        loop.run_in_executor(self._generators, produce)
        index, last = 0, generate.Piece("")
        try:
            while (item := await ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                last = item
                if item.finish_reason is None and item.text:
                    chunk = GenerateChunk(
                        text=item.text, index=index, model=deployment.model, version=deployment.version
                    )
                    await self.nc.publish(reply, msgspec.msgpack.encode(chunk))
                    index += 1
        finally:
            ahead.close()
        return index, last

    # -- following deployments ---------------------------------------------------------------------
    def _on_record(self, entry: KeyValue.Entry) -> None:
        if entry.value:
            self._records[entry.key] = _deployment.decode(entry.value)
        else:  # deleted
            self._records.pop(entry.key, None)
        self._reconcile()

    def _reconcile(self) -> None:
        """Carry out the plan of ``deployments.reconcile``: load what is deployed and not served;
        retire what is served and no longer deployed, but only once every wanted version of that
        model is up (an alias move never leaves a gap)."""
        plan = reconcile(self._records.values(), {k: s.deployment for k, s in self._served.items()}, self._loading)
        for key, deployment in plan.load.items():
            self._loading.add(key)
            self.spawn(f"load-{key}", functools.partial(self._load, key, deployment))
        for key, deployment in plan.update.items():  # only batching settings changed
            served = self._served[key]
            served.batcher.max_batch_size = deployment.max_batch_size
            served.batcher.max_wait_s = deployment.max_wait_ms / 1000
            served.deployment = deployment
        for key in plan.retire:
            self.spawn(f"retire-{key}", functools.partial(self._retire, key))

    async def _retire(self, key: str) -> None:
        served = self._served.pop(key, None)
        if served is not None:
            for actor in served.actors:
                await self.retire_actor(actor)
            await served.batcher.stop()
            log.info("stopped serving %s", key)

    async def _load(self, key: str, deployment: Deployment) -> None:
        try:
            version = await get_version(await registry_kv(self.js, self.names), deployment.model, deployment.version)
            store = await artifacts(self.js, self.names, self.config.js_replicas, manage=False)
            weights = bytes((await store.get(version.artifact)).data or b"")
            model = await asyncio.to_thread(LoadedModel, version, weights, self.config.model_packages)
        except Exception as exc:
            self._failed[key] = f"{type(exc).__name__}: {exc}"
            log.exception("cannot load %s", key)
            self._loading.discard(key)
            return
        self._failed.pop(key, None)
        batcher = DynamicBatcher(
            model.forward,
            max_batch_size=deployment.max_batch_size,
            max_wait_ms=deployment.max_wait_ms,
            executor=self._executor,
            name=f"forward {deployment.model}",
            # What its two callers, the infer and durable actors below, can have in flight.
            max_queued=2 * max(64, deployment.max_batch_size * 4),
        )
        batcher.start()

        async def handle(req: InferRequest, call: Call) -> InferReply:
            inputs = {name: from_wire(t, name) for name, t in req.inputs.items()}
            rows = model.check(inputs)
            outputs, batch_size = await batcher.submit(rows)
            return InferReply(
                outputs={k: to_wire(v) for k, v in outputs.items()},
                model=deployment.model,
                version=deployment.version,
                id=req.id,
                batch_size=batch_size,
                worker=self.instance_id,
            )

        actor = self.add_actor(
            ActorConfig(
                name=f"infer-{deployment.model}-{deployment.version}",
                subject=self.names.infer(deployment.model, deployment.version),
                template=self.names.infer_template(),
                queue_group=self.names.infer_queue_group(deployment.model, deployment.version),
                max_concurrency=max(64, deployment.max_batch_size * 4),
                labels={"model": deployment.model, "version": deployment.version},
            ),
            handle,
            InferRequest,
        )
        actor.extra_stats = batcher.stats
        await actor.start()
        # This worker's own subject, same handler and batcher: where the router sends a hedge.
        direct = self.add_actor(
            ActorConfig(
                name=f"infer-{deployment.model}-{deployment.version}-direct",
                subject=self.names.infer_direct(deployment.model, deployment.version, self.instance_id),
                template=self.names.infer_template(),
                queue_group=None,
                max_concurrency=max(64, deployment.max_batch_size * 4),
                labels={"model": deployment.model, "version": deployment.version},
            ),
            handle,
            InferRequest,
        )
        await direct.start()
        actors: list[Actor[Any]] = [actor, direct, await self._durable_actor(deployment, model, batcher)]
        if version.task == "lm":
            actors.append(await self._generation_actor(deployment, model))
        self._served[key] = Served(deployment, model, batcher, actors)
        self._loading.discard(key)
        log.info("serving %s (batch ≤ %d, wait ≤ %g ms)", key, deployment.max_batch_size, deployment.max_wait_ms)
        self._reconcile()  # versions this one replaces can go now
