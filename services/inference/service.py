"""Wiring of an inference worker.

- ``<prefix>.inference.deploy`` (request/reply): resolve ``MODEL[@VERSION|@ALIAS]`` in the
  registry and record the deployment in ``<prefix>-deployments``.
- Every worker watches the deployments: it loads each version's weights in a worker thread and
  only then subscribes to ``<prefix>.infer.<model>.<version>`` in that version's queue group, so
  more workers mean more throughput with no other change, and a worker that has not loaded a
  model (or cannot) takes none of its requests and does not report ready.
- A deployment moved to another version is loaded in the background; the new subject is served
  before the old one is drained and dropped, so no request fails during the swap.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from nats.js.kv import KeyValue

from services.inference.batching import DynamicBatcher
from services.inference.model import LoadedModel
from shared.actor import Actor, Call
from shared.clock import rfc3339_now
from shared.errors import BadRequest, NotFound
from shared.registry import artifacts, get_version, registry_kv
from shared.schemas import Deployment, DeployRequest, InferReply, InferRequest
from shared.service import Service
from shared.tensors import from_wire, to_wire

log = logging.getLogger(__name__)
_deployment = msgspec.json.Decoder(Deployment)
_json = msgspec.json.Encoder()


@dataclass
class Served:
    deployment: Deployment
    model: LoadedModel
    batcher: DynamicBatcher
    actor: Actor[InferRequest]


class InferenceService(Service):
    name = "inference"
    description = "Serves model versions from the registry on request queues, with dynamic batching."

    deployments: KeyValue

    async def setup(self) -> None:
        self.deployments = await self.ensure_kv(self.names.deployments_bucket)
        await self.ensure_kv(self.names.registry_bucket)
        self._served: dict[str, Served] = {}  # by model
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._watcher: asyncio.Task[None] | None = None
        self.add_actor("deploy", self.names.deploy, self.deploy, DeployRequest, max_concurrency=4)

    async def after_start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="deployments")

    async def stop_intake(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def close_resources(self) -> None:
        for served in self._served.values():
            await served.batcher.stop()
        self._executor.shutdown(wait=False)

    @property
    def is_ready(self) -> bool:
        return super().is_ready and not self._loading

    def metadata(self) -> dict[str, str]:
        meta = {"serving": ",".join(f"{m}@{s.deployment.version}" for m, s in sorted(self._served.items()))}
        if self._failed:
            meta["failed"] = "; ".join(f"{m}: {why}" for m, why in sorted(self._failed.items()))
        return meta

    # -- deploy ----------------------------------------------------------------------------------
    async def deploy(self, req: DeployRequest, _: Call) -> Deployment:
        if req.max_batch_size < 1 or req.max_wait_ms < 0 or req.replicas < 0:
            raise BadRequest("max_batch_size must be ≥ 1, max_wait_ms ≥ 0 and replicas ≥ 0")
        try:
            version = await get_version(await registry_kv(self.js, self.names), req.model, req.ref)
        except NotFound as exc:
            raise BadRequest(exc.description) from None
        deployment = Deployment(
            model=req.model,
            ref=req.ref,
            version=version.version,
            replicas=req.replicas,
            max_batch_size=req.max_batch_size,
            max_wait_ms=req.max_wait_ms,
            updated_at=rfc3339_now(),
        )
        await self.deployments.put(f"deploy.{req.model}", _json.encode(deployment))
        return deployment

    # -- following deployments ---------------------------------------------------------------------
    async def _watch(self) -> None:
        watcher = await self.deployments.watch("deploy.*")
        while True:
            try:
                entry = await watcher.updates(timeout=5)
            except Exception:
                continue
            if entry is None or not entry.value:
                continue
            deployment = _deployment.decode(entry.value)
            current = self._served.get(deployment.model)
            if current is None or current.deployment.version != deployment.version:
                asyncio.get_running_loop().create_task(self._load(deployment))
            elif current.deployment != deployment:  # only batching settings changed
                current.batcher.max_batch_size = deployment.max_batch_size
                current.batcher.max_wait_s = deployment.max_wait_ms / 1000
                current.deployment = deployment

    async def _load(self, deployment: Deployment) -> None:
        key = f"{deployment.model}@{deployment.version}"
        self._loading.add(key)
        try:
            version = await get_version(await registry_kv(self.js, self.names), deployment.model, deployment.version)
            store = await artifacts(self.js, self.names, self.config.js_replicas)
            weights = bytes((await store.get(version.artifact)).data or b"")
            model = await asyncio.to_thread(LoadedModel, version, weights)
        except Exception as exc:
            self._failed[deployment.model] = f"{type(exc).__name__}: {exc}"
            log.exception("cannot load %s", key)
            return
        finally:
            self._loading.discard(key)
        self._failed.pop(deployment.model, None)
        batcher = DynamicBatcher(
            model.forward,
            max_batch_size=deployment.max_batch_size,
            max_wait_ms=deployment.max_wait_ms,
            executor=self._executor,
        )
        batcher.start()
        served = Served(deployment, model, batcher, actor=None)  # type: ignore[arg-type]

        async def handle(req: InferRequest, call: Call) -> InferReply:
            inputs = {name: from_wire(t, name) for name, t in req.inputs.items()}
            rows = model.check(inputs)
            outputs, batch_size = await served.batcher.submit(rows)
            return InferReply(
                outputs={k: to_wire(v) for k, v in outputs.items()},
                model=deployment.model,
                version=deployment.version,
                id=req.id,
                batch_size=batch_size,
            )

        served.actor = self.add_actor(
            f"infer-{deployment.model}",
            self.names.infer(deployment.model, deployment.version),
            handle,
            InferRequest,
            template=self.names.infer_template(),
            queue_group=self.names.infer_queue_group(deployment.model, deployment.version),
            max_concurrency=max(64, deployment.max_batch_size * 4),
        )
        await served.actor.start()
        previous = self._served.get(deployment.model)
        self._served[deployment.model] = served
        log.info("serving %s (batch ≤ %d, wait ≤ %g ms)", key, deployment.max_batch_size, deployment.max_wait_ms)
        if previous is not None:  # the new version answers first; then the old one drains
            await self.retire_actor(previous.actor)
            await previous.batcher.stop()
