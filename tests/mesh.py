"""Mesh set-ups shared by test files: models in the registry, a worker and router ready to serve,
digits@1 deployed, a split stored, the metrics service's
experiment report.  Small utilities live in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import torch
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.discovery import discover
from shared.errors import NotFound
from shared.names import Names
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    ChatTemplate,
    ColumnSpec,
    Deployment,
    DeployRequest,
    ExperimentQuery,
    ExperimentReport,
    MicroPing,
    ModelVersion,
    Split,
    TokenizerSpec,
)
from tests.helpers import ServiceProcess, eventually
from zoo.artifacts import weights_to_bytes
from zoo.classifier import mlp
from zoo.lm import causal_lm

LM_KWARGS: dict[str, Any] = {"dim": 32, "layers": 1, "heads": 2, "context": 64}
LM_EOS = 256  # the bytes tokenizer's end of text


async def register_mlp(nc: NatsClient, names: Names, seed: int) -> tuple[ModelVersion, torch.nn.Module]:
    """A real MLP's weights in the artifacts store and a registry version pointing at them."""
    torch.manual_seed(seed)
    model = mlp(inputs=64, classes=10).eval()
    js = nc.jetstream()
    store = await artifacts(js, names)
    name = f"models/digits/seed{seed}.safetensors"
    await put_object(store, name, weights_to_bytes(model.state_dict()))
    kv = await js.key_value(names.registry_bucket)
    version = ModelVersion(
        model="digits",
        version="",
        artifact=name,
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 64, "classes": 10},
        task="classify",
        dataset="digits@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[64])],
    )
    return await register(kv, version), model


async def register_lm(
    nc: NatsClient,
    names: Names,
    model: str = "lm",
    kwargs: dict[str, Any] | None = None,
    *,
    template: ChatTemplate | None = None,
    no_eos: bool = False,
) -> None:
    """A tiny causal language model ``<model>@1`` with a bytes tokenizer; ``no_eos``: it never
    ends by itself (only ``max_tokens`` or a cancel stops it)."""
    kwargs = kwargs or LM_KWARGS
    torch.manual_seed(0)
    lm = causal_lm(**kwargs)
    if no_eos:
        with torch.no_grad():
            lm.head.out.bias[LM_EOS] = -1e4
    js = nc.jetstream()
    artifact = f"models/{model}/1.safetensors"
    await put_object(await artifacts(js, names), artifact, weights_to_bytes(lm.state_dict()))
    version = ModelVersion(
        model=model,
        version="",
        artifact=artifact,
        factory="zoo.lm:causal_lm",
        kwargs=kwargs,
        task="lm",
        dataset="text@1",
        inputs=[ColumnSpec(name="tokens", dtype="int32", shape=[kwargs["context"] + 1])],
        tokenizer=TokenizerSpec(kind="bytes", vocab_size=257, eos_id=LM_EOS, seq_len=kwargs["context"]),
        chat_template=template,
    )
    await register(await js.key_value(names.registry_bucket), version)


async def serving(nc: NatsClient, names: Names, want: str) -> bool:
    """Whether every inference worker that answers says it serves ``want`` (``model@version``)."""
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
    return bool(pings) and all(want in p.metadata.get("serving", "") for p in pings)


async def start_gateway(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    *,
    router_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> tuple[ServiceProcess, ServiceProcess, str]:
    """An inference worker and a router (on a free port), both ready; returns them and the URL."""
    worker = spawn("services.inference", **(worker_env or {}))
    router = spawn("services.router", AIMESH_ROUTER_PORT="0", **(router_env or {}))
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    base = (await router.wait_ready(nats_url, names.micro_name("router"))).metadata["http"]
    return worker, router, base


async def deploy_digits(nc: NatsClient, names: Names, timeout_s: float = 60) -> ModelVersion:
    """``digits@1`` (the MLP of seed 1) registered, deployed and served by every worker."""
    version, _ = await register_mlp(nc, names, seed=1)
    await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), timeout_s, "the worker to serve digits@1")
    return version


async def put_split(http: aiohttp.ClientSession, base: str, split: dict[str, object]) -> Split:
    """Store a split of ``digits`` through the router's admin API.  The router that stores it
    routes by it at once (other routers follow the bucket)."""
    async with http.put(f"{base}/admin/splits/digits", json=split) as resp:
        assert resp.status == 200, await resp.text()
        return msgspec.json.decode(await resp.read(), type=Split)


async def report_of(nc: NatsClient, names: Names) -> ExperimentReport:
    return await request(nc, names.experiments_query, ExperimentQuery(model="digits"), ExperimentReport)


async def report_when(nc: NatsClient, names: Names, ok: Callable[[ExperimentReport], bool]) -> ExperimentReport | None:
    """The report if ``ok`` says so; None while the metrics service has none yet (it is still
    reading the split) or it does not fit."""
    try:
        report = await report_of(nc, names)
    except NotFound:
        return None
    return report if ok(report) else None
