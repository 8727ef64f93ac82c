"""A small typed async client for programs that talk to the mesh over NATS directly.

    from aimesh.client import MeshClient

    async with await MeshClient.connect("nats://127.0.0.1:4222") as mesh:
        result = await mesh.infer("digits", {"x": rows})             # splits and deployments apply
        async for text in mesh.generate("pylm", "def main():", max_tokens=64):
            print(text, end="")
        rid = await mesh.submit("digits", {"x": rows})              # durable, at-least-once
        outcome = await mesh.result(rid, wait_s=30)

Routing is the router's (``shared.routing``): a version you name, else the model's split
(``sticky_key`` pins you to a variant), else its deployment, with the same fallback when no worker
answers.  Errors are the mesh's typed errors (``shared.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats
import numpy as np
from nats.aio.client import Client as NatsClient

from shared import durable
from shared.client import generation, infer_with_fallback
from shared.config import MeshConfig
from shared.connect import connect_options
from shared.errors import MeshTimeout
from shared.kv import follow, open_bucket
from shared.names import Names, deploy_keys, split_keys
from shared.routing import RoutingTable
from shared.schemas import DurableResult, GenerateRequest, InferRequest
from shared.tensors import from_wire, to_wire


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    batch_size: int


class MeshClient:
    def __init__(self, nc: NatsClient, names: Names) -> None:
        self.nc = nc
        self.names = names
        self.table = RoutingTable()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls, url: str = "nats://127.0.0.1:4222", prefix: str = "aimesh", *, nkey: str | None = None
    ) -> MeshClient:
        """``nkey``: the seed file of the identity to use (the operator's on a mesh with identities:
        ``<data_dir>/auth/operator.nk`` under ``aimesh up``)."""
        config = MeshConfig(nats_url=url, prefix=prefix, nats_nkey=nkey)
        client = cls(await nats.connect(**connect_options(config, f"{prefix}-client", role="operator")), Names(prefix))
        await client._follow()
        return client

    async def _follow(self) -> None:
        js = self.nc.jetstream()
        # Buckets not made yet (no worker or router has run) just mean nothing deployed or split.
        deployments = await open_bucket(js, self.names.deployments_bucket, create=True)
        experiments = await open_bucket(js, self.names.experiments_bucket, create=True)
        assert deployments is not None and experiments is not None
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(follow(kv, keys, lambda e: self.table.apply(e.key, e.value)))
            for kv, keys in ((deployments, deploy_keys()), (experiments, split_keys()))
        ]
        # The watchers deliver the current values first: wait for them, so routing is known.
        for _ in range(50):
            if self.table.deployments:
                break
            await asyncio.sleep(0.01)

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | np.ndarray,
        *,
        version: str | None = None,
        sticky_key: str | None = None,
        timeout_s: float = 30.0,
    ) -> InferResult:
        arrays = inputs if isinstance(inputs, dict) else {"x": inputs}
        route = self.table.route(model, version, sticky_key)
        req = InferRequest(inputs={k: to_wire(np.asarray(v)) for k, v in arrays.items()})
        reply = await infer_with_fallback(self.nc, self.names, model, route, req, timeout_s)
        outputs = {k: from_wire(t, k) for k, t in reply.outputs.items()}
        return InferResult(outputs, reply.model, reply.version, reply.batch_size)

    async def generate(
        self, model: str, prompt: str, *, version: str | None = None, timeout_s: float = 30.0, **params: Any
    ) -> AsyncIterator[str]:
        """Yield text as the model produces it; ``params``: max_tokens, temperature, top_k, top_p,
        stop, seed.  Leaving the loop early (``break``, an exception, closing the generator)
        cancels the generation on its worker."""
        route = self.table.route(model, version)
        req = GenerateRequest(prompt=prompt, **params)
        async with contextlib.aclosing(
            generation(self.nc, self.names, model, route.version, req, timeout_s=timeout_s)
        ) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                if chunk.text:
                    yield chunk.text

    async def submit(
        self, model: str, inputs: dict[str, np.ndarray] | np.ndarray, *, version: str | None = None, id: str = ""
    ) -> str:
        """Queue a durable request; the same ``id`` twice is one request."""
        arrays = inputs if isinstance(inputs, dict) else {"x": inputs}
        route = self.table.route(model, version)
        req = InferRequest(inputs={k: to_wire(np.asarray(v)) for k, v in arrays.items()}, id=id)
        return await durable.submit(self.nc.jetstream(), self.names, model, route.version, req)

    async def result(self, request_id: str, *, wait_s: float = 0.0) -> DurableResult:
        """The durable request's outcome; with ``wait_s``, wait up to that long for it to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            outcome = await durable.fetch(self.nc.jetstream(), self.names, request_id)
            if outcome.state != "pending" or wait_s <= 0:
                return outcome
            if loop.time() > deadline:
                raise MeshTimeout(self.names.result(request_id), wait_s)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.nc.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()
