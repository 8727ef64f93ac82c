"""No arbitrary code from the network, and a training rendezvous bound to the job's address.

- Model factories resolve only inside trusted packages (``zoo`` + ``model_packages``), checked on
  the string before any import; kwargs are plain data.  Pure rules first, then the attack itself
  (``os:system`` with a shell command) against real trainer and inference processes: refused with
  a 400-class error, and the command never runs.
- Rank 0's TCPStore (and gloo) listen on ``TrainerConfig.host`` only, not on every interface.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import msgspec
import numpy as np
import psutil
import pytest
import torch
from nats.aio.client import Client as NatsClient

from aimesh.jobs import ingest
from services.ingest.service import IngestService
from services.trainer import store as tcpstore
from shared.client import request
from shared.config import IngestConfig, MeshConfig, load_mesh_config
from shared.discovery import discover
from shared.errors import BadRequest, ConfigError, Unavailable
from shared.names import Names
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    ColumnSpec,
    Deployment,
    DeployRequest,
    InferReply,
    InferRequest,
    IngestRequest,
    MicroPing,
    ModelVersion,
    TrainAccepted,
    TrainJob,
    TrainRequest,
)
from shared.tensors import to_wire
from tests.helpers import ServiceProcess, eventually
from zoo import ModelSpec, build_model, check_factory, check_kwargs, resolve_factory, trusted_packages
from zoo.artifacts import weights_to_bytes

REFUSED = r"refused: factories are imported only from the trusted packages zoo; .*model_packages"
_job = msgspec.json.Decoder(TrainJob)


# -- the rules, on strings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("os:system", REFUSED),
        ("subprocess:run", REFUSED),
        ("builtins:eval", REFUSED),
        ("posix:system", REFUSED),
        ("zoo_evil:x", REFUSED),  # a prefix of the name is not the package
        ("zoological.models:x", REFUSED),
        ("../x", "must look like package.module:function"),
        ("../x:y", "is not a dotted module path"),
        ("zoo..lm:x", "is not a dotted module path"),
        ("zoo/lm:x", "is not a dotted module path"),
        ("zoo.lm :x", "is not a dotted module path"),
        ("ｚoo:x", "is not a dotted module path"),  # a full-width letter: ASCII identifiers only
        ("zoo.classifier:_private", "must be a public name"),
        ("zoo.classifier:__init__", "must be a public name"),
        ("zoo.classifier:mlp.__globals__", "must be a public name"),
        ("zoo.classifier:mlp:x", "must be a public name"),
        ("zoo.classifier.mlp", "must look like package.module:function"),
        ("x" * 300 + ":f", "at most 256 characters"),
    ],
)
def test_factories_outside_the_trusted_packages_are_refused_before_any_import(path: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_factory(path)
    with pytest.raises(BadRequest, match=message):
        build_model(ModelSpec(factory=path, kwargs={"command": "true"}))


def test_zoo_factories_resolve_and_a_configured_package_is_trusted() -> None:
    assert check_factory("zoo.classifier:mlp") == ("zoo.classifier", "mlp")
    assert check_factory("zoo:build_model") == ("zoo", "build_model")
    model = build_model(ModelSpec(factory="zoo.classifier:mlp", kwargs={"inputs": 4, "classes": 2}))
    assert model(torch.zeros(1, 4)).shape == (1, 2)
    # torch.nn is not trusted by default; listed in model_packages it is, with its submodules.
    linear = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 2, "out_features": 3})
    with pytest.raises(BadRequest, match=REFUSED):
        build_model(linear)
    assert isinstance(build_model(linear, ["torch.nn"]), torch.nn.Linear)
    assert check_factory("torch.nn.modules.linear:Linear", ["torch.nn"])
    with pytest.raises(BadRequest, match=r"trusted packages zoo, torch\.nn;"):
        check_factory("torch:load", ["torch.nn"])  # the parent of a trusted package is not trusted
    assert trusted_packages(["torch.nn", "zoo", "torch.nn"]) == ("zoo", "torch.nn")
    with pytest.raises(ConfigError, match=r"model_packages .*'os/x' is not a package name"):
        trusted_packages(["os/x"])


def test_the_setting_is_read_from_the_environment_and_toml(tmp_path: Path) -> None:
    assert load_mesh_config(env={}).model_packages == []
    assert load_mesh_config(env={"AIMESH_MODEL_PACKAGES": "a.b, c"}).model_packages == ["a.b", "c"]
    assert load_mesh_config(env={"AIMESH_MODEL_PACKAGES": '["a.b"]'}).model_packages == ["a.b"]
    toml = tmp_path / "aimesh.toml"
    toml.write_text('[mesh]\nmodel_packages = ["mymodels"]\n')
    assert load_mesh_config(env={"AIMESH_CONFIG": str(toml)}).model_packages == ["mymodels"]


def test_a_trusted_module_does_not_lend_its_imports() -> None:
    """``zoo.artifacts`` imports safetensors' ``load``: reachable by name, but not defined in zoo."""
    with pytest.raises(BadRequest, match=r"st_load is defined in safetensors\.torch, not in a trusted package"):
        resolve_factory("zoo.artifacts:st_load")
    with pytest.raises(BadRequest, match="has no callable 'torch'"):
        resolve_factory("zoo.classifier:torch")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": b"bytes"}, "kwargs.a is a bytes; only strings, numbers"),
        ({"a": (1, 2)}, "kwargs.a is a tuple"),
        ({"a": {1, 2}}, "kwargs.a is a set"),
        ({"a": [1, object()]}, r"kwargs.a\[1\] is a object"),
        ({"a": float("nan")}, "must be a finite number"),
        ({"a": 2**64}, "out of the 64-bit integer range"),
        ({"a": "x" * 5000}, "longer than 4096 characters"),
        ({"a": {1: 2}}, "has a key that is not a string"),
        ({"a b": 1}, "'a b' is not a keyword argument name"),
        ({"a": [[[[[[[[[1]]]]]]]]]}, "nested deeper than 8 levels"),
        ({"a": list(range(20_000))}, "more than 10000 values"),
    ],
)
def test_kwargs_must_be_bounded_plain_data(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_kwargs(kwargs)


def test_plain_kwargs_pass() -> None:
    check_kwargs({"inputs": 64, "hidden": [128, 64], "dropout": 0.1, "name": "x", "opt": None, "m": {"k": [True]}})


# -- the attack, against real processes ---------------------------------------------------------
@pytest.fixture
async def ingest_service(mesh_config: MeshConfig, tmp_path: Path) -> AsyncIterator[IngestService]:
    """An ingest service that reads this test's folder (a small separable CSV: ``data.csv``)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    rows = [",".join(f"{v:.4f}" for v in r) + f",{int(r[0] + r[1] > 0)}" for r in x]
    (tmp_path / "data.csv").write_text("a,b,c,d,label\n" + "\n".join(rows) + "\n")
    async with IngestService(mesh_config, IngestConfig(roots=[str(tmp_path)])) as service:
        yield service


async def start_trainers(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, n: int, **env: str
) -> list[ServiceProcess]:
    procs = [spawn("services.trainer", AIMESH_TRAINER_NODE_TTL_S="3", **env) for _ in range(n)]
    await asyncio.gather(*(p.wait_ready(nats_url, names.micro_name("trainer"), timeout_s=60) for p in procs))
    return procs


async def job_ended(nc: NatsClient, names: Names, job_id: str, timeout_s: float) -> TrainJob:
    kv = await nc.jetstream().key_value(names.jobs_bucket)

    async def ended() -> TrainJob | None:
        job = _job.decode((await kv.get(f"job.{job_id}")).value or b"")
        return job if job.state in ("complete", "failed") else None

    return await eventually(ended, timeout_s, f"job {job_id} to end")


@pytest.mark.slow
async def test_a_training_request_naming_os_system_is_refused_and_runs_nothing(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    """The reported attack: ``aimesh train --factory os:system --kwargs '{"command": "…"}'``.
    The factory is checked first, so no dataset is needed to reach the check."""
    await start_trainers(spawn, nats_url, names, 1)
    pwned = tmp_path / "pwned"
    attacks = [
        ("os:system", {"command": f"touch {pwned}"}),
        ("subprocess:run", {"args": ["touch", str(pwned)]}),
        ("posix:system", {"command": f"touch {pwned}"}),
    ]
    for factory, kwargs in attacks:
        req = TrainRequest(model="m", dataset="digits", factory=factory, kwargs=kwargs)
        with pytest.raises(BadRequest, match=REFUSED) as refused:
            await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
        assert refused.value.code == 400
    # Not in the trusted packages' reach either: a zoo module's import, or kwargs that are not data.
    with pytest.raises(BadRequest, match=r"defined in safetensors\.torch"):
        req = TrainRequest(model="m", dataset="digits", factory="zoo.artifacts:st_load", kwargs={"data": "x"})
        await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    with pytest.raises(BadRequest, match=r"kwargs.hidden\[0\] is a bytes"):
        req = TrainRequest(model="m", dataset="digits", factory="zoo.classifier:mlp", kwargs={"hidden": [b"x"]})
        await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    assert not pwned.exists()


@pytest.mark.slow
async def test_a_job_record_naming_os_system_is_refused_by_the_rank_itself(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    """A job written straight into the jobs bucket (past ``submit``'s checks): the rank refuses
    it before importing anything and fails the job, which is not retried."""
    await start_trainers(spawn, nats_url, names, 1)
    pwned = tmp_path / "pwned"
    req = TrainRequest(
        model="m", dataset="digits@1", factory="os:system", kwargs={"command": f"touch {pwned}"}, max_restarts=3
    )
    job = TrainJob(job_id="m-evil", request=req, state="forming", forming_deadline=time.time() + 30)
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    await kv.create("job.m-evil", msgspec.json.encode(job))
    ended = await job_ended(nc, names, "m-evil", 90)
    assert ended.state == "failed" and ended.restarts == 0
    assert "model factory 'os:system' refused" in ended.error and "model_packages" in ended.error
    assert not pwned.exists()


@pytest.mark.slow
async def test_an_inference_worker_refuses_a_registry_entry_naming_os_system(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    worker = spawn("services.inference")
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    pwned = tmp_path / "pwned"
    js = nc.jetstream()
    store = await artifacts(js, names)
    await put_object(store, "models/evil/1.safetensors", weights_to_bytes({"w": torch.zeros(1)}))
    version = ModelVersion(
        model="evil",
        version="",
        artifact="models/evil/1.safetensors",
        factory="os:system",
        kwargs={"command": f"touch {pwned}"},
        task="classify",
        dataset="nothing@1",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[1])],
    )
    registered = await register(await js.key_value(names.registry_bucket), version)
    with pytest.raises(BadRequest, match="model factory 'os:system' refused"):
        await request(nc, names.deploy, DeployRequest(model="evil"), Deployment)
    # A deployment record written into the bucket directly (skipping deploy's check): the worker
    # refuses the version when it loads it.
    deployments = await js.key_value(names.deployments_bucket)
    record = Deployment(model="evil", ref="latest", version=registered.version)
    await deployments.put("deploy.evil.latest", msgspec.json.encode(record))

    async def refused() -> MicroPing | None:
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
        return next((p for p in pings if "evil@1" in p.metadata.get("failed", "")), None)

    ping = await eventually(refused, 30, "the worker to refuse evil@1")
    assert "model factory 'os:system' refused" in ping.metadata["failed"]
    assert "evil@1" not in ping.metadata.get("serving", "") and ping.metadata["state"] == "ready"
    x = to_wire(torch.zeros(1, 1).numpy())
    with pytest.raises(Unavailable):  # nobody serves the version: no responders
        await request(
            nc, names.infer("evil", registered.version), InferRequest(inputs={"x": x}), InferReply, timeout_s=5
        )
    assert not pwned.exists()


# -- the rendezvous -------------------------------------------------------------------------------
def _listening(pid: int) -> list[tuple[str, int]]:
    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def test_rank_zeros_store_listens_on_the_given_address_only() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tcpstore.create_store(f"127.0.0.1:{port}", 0, 1, timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert [a for a in _listening(os.getpid()) if a[1] == port] == [("127.0.0.1", port)]
    assert tcpstore.split_master("[::1]:5") == ("::1", 5)
    with pytest.raises(ValueError, match="must look like host:port"):
        tcpstore.split_master("nohost")
    assert tcpstore.interface_of("127.0.0.1") is not None
    env = tcpstore.collective_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "eth9"})
    assert set(env) == {"GLOO_SOCKET_IFNAME"}  # a value already set wins


@pytest.mark.slow
async def test_a_running_jobs_rendezvous_listens_on_the_trainer_host_only(
    ingest_service: IngestService,
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    """A two-node job with a factory from a configured package (``torch.nn``, through
    AIMESH_MODEL_PACKAGES on the agents and from them to the ranks): while it runs, rank 0's
    TCPStore (the job's ``master`` port) and every socket either rank listens on (gloo's too) are
    bound to 127.0.0.1, none to the wildcard address; and the job completes."""
    agents = await start_trainers(spawn, nats_url, names, 2, AIMESH_MODEL_PACKAGES="torch.nn")
    csv = tmp_path / "data.csv"
    await ingest(nc, names, IngestRequest(paths=[str(csv)], dataset="tab", label="label", shards=2), progress=False)
    req = TrainRequest(
        model="lin",
        dataset="tab",
        factory="torch.nn:Linear",
        kwargs={"in_features": 4, "out_features": 2},
        nodes=2,
        epochs=200,
        batch_size=32,
        lr=1e-2,
    )
    accepted = await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    kv = await nc.jetstream().key_value(names.jobs_bucket)

    async def ranks_listening() -> tuple[int, dict[int, list[tuple[str, int]]]] | None:
        job = _job.decode((await kv.get(f"job.{accepted.job_id}")).value or b"")
        assert job.state != "failed", job.error
        if not job.master:
            return None
        port = tcpstore.split_master(job.master)[1]
        ranks = {c.pid: _listening(c.pid) for a in agents for c in psutil.Process(a.pid).children()}
        store_up = any(p == port for sockets in ranks.values() for _, p in sockets)
        return (port, ranks) if len(ranks) == 2 and store_up and all(ranks.values()) else None

    port, ranks = await eventually(ranks_listening, 60, "both ranks to listen (the store and gloo)")
    assert any(("127.0.0.1", port) in sockets for sockets in ranks.values())
    assert all(ip == "127.0.0.1" for sockets in ranks.values() for ip, _ in sockets), ranks
    final = await job_ended(nc, names, accepted.job_id, 120)
    assert final.state == "complete", final.error
