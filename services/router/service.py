"""Wiring of the router: the HTTP gateway over the inference workers.

It follows the deployments bucket (model → served version) and the registry (metadata), and
turns each HTTP inference into one NATS request to ``<prefix>.infer.<model>.<version>``, with
trace context and a deadline; no responders (the request surely never ran) is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Hashable, Mapping
from typing import Any, Protocol, Self, TypeVar, cast

import msgspec
import numpy as np
from aiohttp import web
from nats.js.kv import KeyValue

from services.router import edge
from services.router.http import build_app, parse_keys
from services.router.oip import tensor_metadata
from services.router.openai import ChatMessage, chat_request
from services.router.openai import add_routes as add_openai_routes
from services.router.stats import ExposureLog, RouteCounters, deployed_versions
from shared import durable, events
from shared.actor import ActorConfig, Call
from shared.client import generation, infer_with_fallback, request
from shared.coalesce import Coalescer, Served
from shared.config import DurableConfig, MeshConfig, RouterConfig, load_durable_config, load_router_config
from shared.datasets import get_manifest
from shared.discovery import discover
from shared.errors import ConfigError, MeshTimeout, NotFound, ServiceError, Unavailable
from shared.experiments import delete_split, put_split
from shared.hedge import Hedger, Responders
from shared.httpserve import serve_app
from shared.names import deploy_keys, split_keys
from shared.registry import get_version, registry_kv
from shared.routing import Route, RoutingTable
from shared.schemas import (
    DatasetManifest,
    Deployment,
    DurableResult,
    ExposureBatch,
    Feedback,
    GenerateChunk,
    GenerateRequest,
    InferReply,
    InferRequest,
    MicroPing,
    ModelVersion,
    RouteStats,
    Split,
)
from shared.service import Service
from shared.splits import mirrors_for
from shared.tensors import from_wire, to_wire
from shared.tls import check_http_exposure, server_context

log = logging.getLogger(__name__)


class _HasVersion(Protocol):
    @property
    def version(self) -> str: ...


R = TypeVar("R", bound=_HasVersion)


class RouterService(Service):
    name = "router"
    description = "The HTTP gateway: Open Inference Protocol v2 and OpenAI-compatible APIs, with A/B splits."

    deployments: KeyValue
    experiments: KeyValue

    def __init__(
        self, config: MeshConfig, router: RouterConfig | None = None, durable: DurableConfig | None = None
    ) -> None:
        super().__init__(config)
        self.router_config = router or RouterConfig()
        self.durable_config = durable or DurableConfig()
        self._runner: web.AppRunner | None = None
        self.http_url = ""
        self.counters = RouteCounters(lambda: deployed_versions(self.table))  # labels: deployed names only
        self.exposures = ExposureLog()
        self.table = RoutingTable()
        self._lm: set[str] = set()
        self._versions: dict[tuple[str, str], ModelVersion] = {}  # registry records, by (model, version)
        self._manifests: dict[str, DatasetManifest] = {}  # by NAME@VERSION
        self._mirror_slots = asyncio.Semaphore(64)
        self.coalescer = Coalescer()
        self._responders = Responders()
        self.hedger = Hedger(
            budget=self.router_config.hedge_budget,
            on_hedge=self._count_hedge,
        )
        self.mirrors_sent = 0
        self.mirrors_dropped = 0

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        return cls(config, load_router_config(env), load_durable_config(env))

    async def setup(self) -> None:
        self.deployments = await self.ensure_kv(self.names.deployments_bucket)
        self.experiments = await self.ensure_kv(self.names.experiments_bucket)
        await self.ensure_kv(self.names.registry_bucket)
        for config in durable.stream_configs(self.names, self.durable_config):
            await self.ensure_stream(config)
        await self.ensure_stream(events.stream_config(self.names))
        self.add_actor(
            ActorConfig(
                name="infer-routed",
                subject=self.names.infer_routed_subjects,
                template=self.names.infer_routed("{model}"),
                queue_group=self.names.queue_group("router"),
            ),
            self.infer_routed,
            InferRequest,
        )
        cfg = self.router_config
        try:
            keys = parse_keys(cfg.api_keys)
        except ValueError as exc:
            raise ConfigError(f"[router] api_keys: {exc}") from None
        check_http_exposure("router", cfg.host, has_keys=bool(keys), insecure=cfg.insecure)
        if cfg.tls_cert is None and cfg.tls_key is None:
            tls = None
        elif cfg.tls_cert and cfg.tls_key:
            tls = server_context(cfg.tls_cert, cfg.tls_key)
        else:
            raise ConfigError("[router] tls_cert and tls_key go together: set both for HTTPS, or neither")
        app = build_app(
            self,
            max_body_bytes=cfg.max_body_bytes,
            timeout_s=cfg.timeout_s,
            max_concurrency=cfg.max_concurrency,
            api_keys=keys,
            body_timeout_s=cfg.body_timeout_s,
        )
        add_openai_routes(app, self)
        # The limits a body meets on its way: a binary body travels at about its own size (the
        # encoding adds well under 4 KiB); a JSON body shrinks (numbers as text become 4 bytes).
        bus = self.nc.max_payload
        log.info(
            "size limits: HTTP bodies up to %d bytes ([router] max_body_bytes), bus messages up to %d bytes "
            "(the NATS server's max_payload), durable requests up to %d bytes ([durable] requests_max_bytes)",
            cfg.max_body_bytes,
            bus,
            min(bus, durable.largest_message(self.durable_config.requests_max_bytes)),
        )
        if cfg.max_body_bytes + 4096 > bus:
            log.warning(
                "[router] max_body_bytes (%d) is over what the bus carries (max_payload %d bytes): a binary "
                "inference body near that size gets 413 from the bus; raise the NATS server's max_payload "
                "([up] nats_max_payload, at most 64 MiB) or lower max_body_bytes",
                cfg.max_body_bytes,
                bus,
            )
        # SO_REUSEPORT: several routers on one host share the port (aimesh up --router N).
        self._runner, self.http_url = await serve_app(
            app, cfg.host, cfg.port, reuse_port=cfg.port != 0, ssl_context=tls, header_timeout_s=cfg.header_timeout_s
        )

    async def after_start(self) -> None:
        self.watch(self.deployments, deploy_keys(), self._on_entry, name="deployments")
        self.watch(self.experiments, split_keys(), self._on_entry, name="splits")
        self.every(0.25, self._flush_exposures, name="exposures")

    async def stop_intake(self) -> None:
        # Close the listener and finish in-flight HTTP requests before the actors drain.
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def close_resources(self) -> None:
        # Requests have finished and the exposures timer is cancelled (drain step 2): the
        # exposures they left are sent before NATS drains.
        await self._flush_exposures()

    def route_stats(self) -> list[RouteStats]:
        return self.counters.stats()

    # -- experiments: exposures and feedback -----------------------------------------------------
    async def _flush_exposures(self) -> None:
        while len(self.exposures) and await self._publish_exposures():
            pass

    async def _publish_exposures(self) -> bool:
        """One batch per model to the events stream; False (batch kept) when JetStream is away."""
        for model, batch in self.exposures.take().items():
            body = msgspec.msgpack.encode(ExposureBatch(router=self.instance_id, exposures=batch))
            try:
                await self.js.publish(self.names.exposures(model), body)
            except Exception:
                self.exposures.put_back(batch)
                log.warning(
                    "exposures not stored (%d pending, %d dropped so far)",
                    len(self.exposures),
                    self.exposures.dropped,
                    exc_info=True,
                )
                return False
        return True

    async def feedback(self, fb: Feedback, idempotency_key: str | None) -> None:
        fb = events.check_feedback(fb)
        if fb.model not in self.table.models() and fb.model not in self.table.splits:
            raise NotFound(f"model {fb.model!r} is not deployed: feedback names a model that served the request")
        if not fb.ts:
            fb = msgspec.structs.replace(fb, ts=time.time())
        await events.publish_feedback(self.js, self.names, fb, idempotency_key)

    def metadata(self) -> dict[str, str]:
        return {"http": self.http_url} if self.http_url else {}

    def _on_entry(self, entry: KeyValue.Entry) -> None:
        """A deployment or split changed: routing follows it at once (no restart)."""
        stored = self.table.apply(entry.key, entry.value)
        if isinstance(stored, Deployment):
            self.spawn("learn", functools.partial(self._learn_task, stored))

    async def _learn_task(self, deployment: Deployment) -> None:
        """Remember which deployed models are language models (for /v1/models); the version's
        record is then cached for metadata and class names."""
        try:
            version = await self._model_version(deployment.model, deployment.version)
        except Exception:
            return
        if version.task == "lm":
            self._lm.add(deployment.model)

    async def _model_version(self, model: str, version: str) -> ModelVersion:
        """The registry's record of ``model@version`` (404 when there is none); a numbered
        version's record never changes, so it is cached (an alias is read each time)."""
        cached = self._versions.get((model, version))
        if cached is not None:
            return cached
        record = await get_version(await registry_kv(self.js, self.names), model, version)
        if version.isdigit():
            self._versions[(model, version)] = record
        return record

    async def class_names(self, model: str, version: str) -> list[str]:
        """The class labels of a classifier's version (empty when it has none)."""
        record = await self._model_version(model, version)
        return list(record.label_classes) if record.task == "classify" else []

    def _route(self, model: str, version: str | None, headers: Mapping[str, str] | None) -> Route:
        durable.check_names(model, version)  # 400 before anything names a subject with them
        split = None if version else self.table.splits.get(model)
        key = (headers or {}).get(split.sticky) if split is not None and split.sticky else None
        return self.table.route(model, version, key)

    async def infer_routed(self, req: InferRequest, call: Call) -> InferReply:
        """``<prefix>.infer.<model>`` for NATS programs: the same split, stickiness (the split's
        header, sent as a NATS header), mirrors and fallback as over HTTP."""
        model = call.subject.rsplit(".", 1)[1]
        if not req.id:  # the reply carries it: what feedback names
            req = msgspec.structs.replace(req, id=edge.new_request_id())
        route = self._route(model, None, call.headers)
        # The caller's deadline, capped like an HTTP request's: no NATS caller holds a worker longer.
        cap = self.router_config.timeout_s
        timeout_s = min(call.remaining_s() or cap, cap)
        if route.split is not None:
            for mirror in mirrors_for(route.split):
                self._mirror(model, mirror, req, timeout_s)
        return await self._counted(model, route, req.id, self._hedged(model, route, req, timeout_s))

    async def _direct(
        self, model: str, version: str, worker: str, req: InferRequest, timeout_s: float
    ) -> InferReply | None:
        """``req`` to one worker's own subject; None when that worker is gone (no responders)."""
        subject = self.names.infer_direct(model, version, worker)
        try:
            return await request(
                self.nc, subject, req, InferReply, timeout_s=timeout_s, template=self.names.infer_template()
            )
        except Unavailable:
            return None

    def _count_hedge(self, key: Hashable, won: bool) -> None:
        model, version = cast(tuple[str, str], key)  # the key _hedged gives the hedger
        self.counters.record_hedge(model, version, won)
        if won:
            self._responders.suspect(model, version)

    def _hedged(self, model: str, route: Route, req: InferRequest, timeout_s: float) -> Awaitable[InferReply]:
        """One inference on ``route``, sent again when its answer is late (shared/hedge.py);
        every attempt ends by the same deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        async def attempt(n: int) -> InferReply:
            left = max(0.001, deadline - loop.time())
            worker = (
                self._responders.pick(model, route.version, n) if n else self._responders.first(model, route.version)
            )
            reply = await self._direct(model, route.version, worker, req, left) if worker else None
            if reply is None:  # no worker named, or it is gone: the queue group picks one
                reply = await infer_with_fallback(self.nc, self.names, model, route, req, left)
            self._responders.answered(model, reply.version, reply.worker)
            return reply

        return self.hedger.run((model, route.version), attempt)

    async def submit_durable(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Queue a durable request for a deployed version (400 for a name that is not a token,
        404 for one not deployed, 429 when the requests stream is full: nothing queued)."""
        served = self._route(model, version, headers).version
        req = InferRequest(inputs={k: to_wire(v) for k, v in inputs.items()}, id=request_id or "")
        deployments = self.table.deployments.values()
        return await durable.submit(self.js, self.names, model, served, req, deployments=deployments), served

    async def durable_result(self, request_id: str) -> DurableResult:
        return await durable.fetch(self.js, self.names, request_id, kept_s=self.durable_config.results_max_age_s)

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        request_id: str,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Serve one request where the routing table says (see shared.routing)."""
        route = self._route(model, version, headers)
        if route.split is not None:
            mirrors = mirrors_for(route.split)
            if mirrors:
                req = InferRequest(inputs={k: to_wire(v) for k, v in inputs.items()}, id=request_id)
                for mirror in mirrors:
                    self._mirror(model, mirror, req, timeout_s)

        async def send(batch: dict[str, np.ndarray]) -> Served:
            req = InferRequest(inputs={k: to_wire(v) for k, v in batch.items()}, id=request_id)
            reply = await self._hedged(model, route, req, timeout_s)
            return Served(reply.version, {k: from_wire(t, k) for k, t in reply.outputs.items()})

        if self.router_config.coalesce:
            key = (model, route.version, route.fallback, timeout_s)
            call = self.coalescer.infer(key, inputs, send, max_rows=self.table.max_batch_size(model, route.version))
        else:
            call = send(inputs)
        served = await self._counted(model, route, request_id, call)
        return served.version, served.outputs

    async def _counted(self, model: str, route: Route, request_id: str, call: Awaitable[R]) -> R:
        """One inference, counted per served version; an exposure when an experiment routed it."""
        t0 = time.perf_counter()
        served, code = route.version, 200
        try:
            result = await call
            served = result.version
            return result
        except ServiceError as exc:
            code = exc.code
            raise
        except MeshTimeout:
            code = 504
            raise
        except Exception:
            code = 500
            raise
        finally:
            elapsed = time.perf_counter() - t0
            self.counters.record(model, served, code, elapsed)
            if route.split is not None and request_id:
                self.exposures.record(
                    request_id=request_id,
                    model=model,
                    variant=served,
                    experiment=route.split.experiment,
                    latency_s=elapsed,
                    code=code,
                )

    def lm_models(self) -> list[str]:
        return sorted(self.table.models() & self._lm)

    async def generate(
        self, model: str, req: GenerateRequest, chat: list[ChatMessage] | None = None
    ) -> AsyncIterator[GenerateChunk]:
        """Stream a completion from the version the split or the deployment picks: 404 for a
        model that is not deployed or not a language model; with ``chat``, the prompt is the
        messages in the version's chat template.  Ended before its last chunk (the caller closed
        it: its client is gone; or an error), the generation is cancelled on its worker."""
        served = self.table.route(model, None, None).version
        version = await self._language_model(model, served, need_version=chat is not None)
        if chat is not None:
            assert version is not None
            req = chat_request(version, req, chat)
        req = msgspec.structs.replace(req, id=req.id or edge.new_request_id())
        try:
            async with contextlib.aclosing(generation(self.nc, self.names, model, served, req)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk
        except Unavailable:
            raise Unavailable(f"no inference worker generates with {model}@{served} (start workers)") from None

    async def _language_model(self, model: str, version: str, *, need_version: bool) -> ModelVersion | None:
        """The registry's record of ``model@version``, or None when the model is known to be a
        language model and the record is not needed; 404 when it is not a language model."""
        if model in self._lm and not need_version:
            return None
        found = await self._model_version(model, version)
        if found.task != "lm":
            raise NotFound(
                f"model {model!r} is not a language model (version {version} is a {found.task!r} model): "
                "GET /v1/models lists the language models"
            )
        return found

    def _mirror(self, model: str, version: str, req: InferRequest, timeout_s: float) -> None:
        """Send a copy and forget it: never slower for the caller; dropped (and counted) when
        too many copies are already in flight."""
        if self._mirror_slots.locked():
            self.mirrors_dropped += 1
            return

        async def send() -> None:
            async with self._mirror_slots:
                try:
                    await request(
                        self.nc,
                        self.names.infer(model, version),
                        req,
                        bytes,
                        timeout_s=timeout_s,
                        template=self.names.infer_template(),
                    )
                except Exception:
                    log.debug("mirror to %s@%s failed", model, version, exc_info=True)

        self.mirrors_sent += 1
        self.spawn("mirror", send)

    # -- admin -----------------------------------------------------------------------------------
    async def set_split(self, split: Split) -> Split:
        split = await put_split(self.js, self.names, split)
        self.table.splits[split.model] = split  # this instance applies it at once; others via the watch
        return split

    def get_split(self, model: str) -> Split | None:
        return self.table.splits.get(model)

    async def delete_split(self, model: str) -> None:
        await delete_split(self.js, self.names, model)
        self.table.splits.pop(model, None)

    async def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """OIP model metadata of ``version`` (any registered one; 404 when the registry has none),
        else of the version the model's requests go to; ``versions`` lists the served ones."""
        v = await self._model_version(model, version or self._deployed_ref(model))
        return {
            "name": model,
            "versions": self.table.versions(model),
            "platform": "pytorch",
            "inputs": [tensor_metadata(c.name, c.dtype, list(c.shape)) for c in v.inputs],
            "outputs": _outputs_metadata(v),
            "parameters": await self._parameters(v),
        }

    async def _parameters(self, v: ModelVersion) -> dict[str, Any]:
        """What a client needs to build inputs and read outputs: the version described, its task
        and dataset, and for a tabular classifier its input columns (in the order packed into
        ``x``), the label column and the class names (index order of ``class``)."""
        out: dict[str, Any] = {"version": v.version, "task": v.task, "dataset": v.dataset}
        if v.task != "classify":
            return out
        manifest = await self._manifest(v.dataset)
        if manifest is not None and manifest.features:
            out["input_columns"] = list(manifest.features)
        if manifest is not None and manifest.label:
            out["label_column"] = manifest.label
        if v.label_classes:
            out["label_classes"] = list(v.label_classes)
        return out

    async def _manifest(self, ref: str) -> DatasetManifest | None:
        """The dataset version a model was trained on (cached: a version never changes), or None
        when it is not (or no longer) stored: metadata then says less, it does not fail."""
        if ref in self._manifests:
            return self._manifests[ref]
        dataset, _, number = ref.partition("@")
        try:
            manifest = await get_manifest(self.js, self.names, dataset, number or None)
        except ServiceError:
            return None
        if number.isdigit():
            self._manifests[ref] = manifest
        return manifest

    def _deployed_ref(self, model: str) -> str:
        """The version an unversioned request is described by: the default deployment's, else
        the split's control, else the registry's latest."""
        deployment = self.table.default(model)
        if deployment is not None:
            return deployment.version
        split = self.table.splits.get(model)
        return split.control_version if split is not None and split.control_version else "latest"

    async def model_ready(self, model: str, version: str | None) -> bool:
        """Whether a worker serves what a request for ``model`` (at ``version``) would reach:
        404 when that is not deployed (nor split), False while no worker serves it yet.  With no
        version: every variant of the split with a positive weight, else the default deployment
        (or the version it replaced, while the new one loads)."""
        durable.check_names(model, version)
        if version:
            self.table.check_served(model, version)
            wanted = [[version]]
        else:
            split = self.table.splits.get(model)
            if split is not None:
                wanted = [[v.version] for v in split.variants if v.weight > 0]
            else:
                route = self.table.route(model)  # 404 when not deployed
                wanted = [[route.version, *([route.fallback] if route.fallback else [])]]
        pings = await discover(self.nc, "PING", MicroPing, name=self.names.micro_name("inference"), wait_s=0.3)
        serving = {s for p in pings for s in p.metadata.get("serving", "").split(",")}
        return all(any(f"{model}@{v}" in serving for v in group) for group in wanted)


def _outputs_metadata(v: ModelVersion) -> list[dict[str, Any]]:
    """The outputs a version's forward pass returns (see services/inference/model.py), and
    ``label`` for a classifier that knows its class names (returned when asked for by name)."""
    if v.task == "lm":
        seq = v.inputs[0].shape[0] if v.inputs and v.inputs[0].shape else -1
        return [tensor_metadata("logits", "float32", [seq, int(v.kwargs.get("vocab", 0))])]
    outputs = [tensor_metadata("logits", "float32", [int(v.kwargs.get("classes", 0))])]
    if v.task == "classify":
        outputs.append(tensor_metadata("class", "int64", []))
        if v.label_classes:
            outputs.append(tensor_metadata("label", "str", []))
    return outputs
