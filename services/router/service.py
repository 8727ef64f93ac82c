"""Wiring of the router: the HTTP gateway over the inference workers.

It follows the deployments bucket (model → served version) and the registry (metadata), and
turns each HTTP inference into one NATS request to ``<prefix>.infer.<model>.<version>``, with
trace context and a deadline; no responders (the request surely never ran) is a 503.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import numpy as np
from aiohttp import web
from nats.js.kv import KeyValue

from services.router.http import build_app
from services.router.oip import tensor_metadata
from shared.client import request
from shared.config import RouterConfig, load_router_config
from shared.discovery import discover
from shared.errors import NotFound, Unavailable
from shared.httpserve import serve_app
from shared.registry import get_version, registry_kv
from shared.schemas import Deployment, InferReply, InferRequest, MicroPing
from shared.service import Service
from shared.tensors import from_wire, to_wire

log = logging.getLogger(__name__)
_deployment = msgspec.json.Decoder(Deployment)


class RouterService(Service):
    name = "router"
    description = "The HTTP gateway: Open Inference Protocol v2 and OpenAI-compatible APIs, with A/B splits."

    router_config: RouterConfig
    _runner: web.AppRunner | None = None
    http_url: str = ""

    async def setup(self) -> None:
        self.router_config = load_router_config()
        self.deployments: KeyValue = await self.ensure_kv(self.names.deployments_bucket)
        await self.ensure_kv(self.names.registry_bucket)
        self._deployed: dict[str, Deployment] = {}
        self._watcher: asyncio.Task[None] | None = None
        app = build_app(self, max_body_bytes=self.router_config.max_body_bytes)
        self._runner, self.http_url = await serve_app(app, self.router_config.host, self.router_config.port)

    async def after_start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="deployments")

    async def stop_intake(self) -> None:
        # Close the listener and finish in-flight HTTP requests before the actors drain.
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    def metadata(self) -> dict[str, str]:
        return {"http": self.http_url} if self.http_url else {}

    async def _watch(self) -> None:
        watcher = await self.deployments.watch("deploy.>")
        while True:
            try:
                entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
            except Exception:
                continue
            if entry is None:
                continue
            if entry.value:
                self._deployed[entry.key] = _deployment.decode(entry.value)
            else:
                self._deployed.pop(entry.key, None)

    def default_version(self, model: str) -> str | None:
        """What a request naming only the model gets: the deployment of ``latest`` if there is
        one, else the most recently deployed version."""
        records = [d for d in self._deployed.values() if d.model == model]
        if not records:
            return None
        latest = next((d for d in records if d.ref == "latest"), None)
        return (latest or max(records, key=lambda d: d.updated_at)).version

    def _version_for(self, model: str, version: str | None) -> str:
        if version:
            return version
        default = self.default_version(model)
        if default is None:
            raise NotFound(f"model {model!r} is not deployed (aimesh deploy {model})")
        return default

    # -- the Gateway the HTTP routes use ---------------------------------------------------------
    async def infer(
        self, model: str, version: str | None, inputs: dict[str, np.ndarray], request_id: str, timeout_s: float
    ) -> tuple[str, dict[str, np.ndarray]]:
        served = self._version_for(model, version)
        req = InferRequest(inputs={k: to_wire(v) for k, v in inputs.items()}, id=request_id)
        try:
            reply = await request(
                self.nc,
                self.names.infer(model, served),
                req,
                InferReply,
                timeout_s=timeout_s,
                template=self.names.infer_template(),
            )
        except Unavailable:
            raise Unavailable(f"no inference worker serves {model}@{served} (deploy it, or start workers)") from None
        return reply.version, {k: from_wire(t, k) for k, t in reply.outputs.items()}

    async def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        v = await get_version(await registry_kv(self.js, self.names), model, version or self._deployed_ref(model))
        outputs = [tensor_metadata("logits", "float32", [int(v.kwargs.get("classes", v.kwargs.get("vocab", 0)))])]
        if v.task == "classify":
            outputs.append(tensor_metadata("class", "int64", []))
        return {
            "name": model,
            "versions": [v.version],
            "platform": "pytorch",
            "inputs": [tensor_metadata(c.name, c.dtype, list(c.shape)) for c in v.inputs],
            "outputs": outputs,
        }

    def _deployed_ref(self, model: str) -> str:
        return self.default_version(model) or "latest"

    async def model_ready(self, model: str, version: str | None) -> bool:
        try:
            served = self._version_for(model, version)
        except NotFound:
            return False
        pings = await discover(self.nc, "PING", MicroPing, name=self.names.micro_name("inference"), wait_s=0.3)
        return any(f"{model}@{served}" in p.metadata.get("serving", "").split(",") for p in pings)
