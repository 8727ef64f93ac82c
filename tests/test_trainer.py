"""Training across real trainer processes: DP equivalence, PP equivalence, faults, bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NatsClient

from aimesh.datasets_cmd import ingest
from aimesh.train_cmd import train
from services.ingest.service import IngestService
from services.trainer import data
from shared.client import request
from shared.config import MeshConfig
from shared.datasets import DatasetReader
from shared.discovery import discover
from shared.errors import BadRequest
from shared.names import Names
from shared.registry import get_version, registry_kv
from shared.schemas import IngestRequest, MicroPing, TrainAccepted, TrainJob, TrainProgress, TrainRequest, TrainResult
from tests.helpers import ServiceProcess, eventually
from zoo import ModelSpec, build_model
from zoo.lm import lm_loss

pytestmark = pytest.mark.slow

DIGITS_MLP = {"factory": "zoo.classifier:mlp", "kwargs": {"inputs": 64, "classes": 10}}


@pytest.fixture
async def ingest_service(
    mesh_config: MeshConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[IngestService]:
    monkeypatch.setenv("AIMESH_INGEST_ROOTS", str(tmp_path))  # the corpus a test writes is read from there
    async with IngestService(mesh_config) as service:
        yield service


async def trainers(spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, n: int) -> list[ServiceProcess]:
    procs = [spawn("services.trainer", OTEL_SDK_DISABLED="false", AIMESH_TRAINER_NODE_TTL_S="3") for _ in range(n)]
    await asyncio.gather(*(p.wait_ready(nats_url, names.micro_name("trainer"), timeout_s=60) for p in procs))
    return procs


async def test_two_rank_dp_matches_one_process_and_learns_digits(
    ingest_service: IngestService, spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    await trainers(spawn, nats_url, names, 2)
    _, manifest = await ingest(
        nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=4), progress=False
    )
    assert manifest is not None
    common = {**DIGITS_MLP, "model": "digits", "dataset": "digits", "epochs": 8, "batch_size": 64, "lr": 3e-3}
    two = await train(nc, names, TrainRequest(nodes=2, **common), show=False)  # type: ignore[arg-type]
    one = await train(nc, names, TrainRequest(nodes=1, **common), show=False)  # type: ignore[arg-type]
    assert two.state == "complete", two.error
    assert one.state == "complete", one.error
    # Same global batch and seed: accuracies agree within 3 points, and both learn the task.
    assert two.metrics["eval_accuracy"] >= 0.9 and one.metrics["eval_accuracy"] >= 0.9
    assert abs(two.metrics["eval_accuracy"] - one.metrics["eval_accuracy"]) <= 0.03
    kv = await registry_kv(nc.jetstream(), names)
    first, latest = await get_version(kv, "digits", "1"), await get_version(kv, "digits")
    assert (first.version, latest.version) == ("1", "2")
    assert first.dataset == "digits@1" and first.job_id == two.job_id and first.trace_id == two.trace_id
    assert first.dataset_trace_id == manifest.trace_id and first.hyperparameters["nodes"] == 2


async def test_pipeline_losses_match_single_process(
    ingest_service: IngestService,
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    await trainers(spawn, nats_url, names, 2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    _, manifest = await ingest(
        nc, names, IngestRequest(paths=[str(corpus)], dataset="text", shards=2, seq_len=32), progress=False
    )
    assert manifest is not None
    kwargs = {"dim": 32, "layers": 2, "heads": 2, "context": 32}
    req = TrainRequest(
        model="tiny-lm",
        factory="zoo.lm:causal_lm",
        kwargs=kwargs,
        dataset="text",
        nodes=2,
        parallel="pp",
        batch_size=16,
        microbatches=4,
        lr=1e-3,
        max_steps=8,
        seed=5,
    )
    job = await train(nc, names, req, show=False)
    assert job.state == "complete", job.error
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    result = msgspec.json.decode((await kv.get(f"result.{job.job_id}.{job.attempt}")).value or b"", type=TrainResult)

    # The same model, data order and steps in this process.
    arrays = await DatasetReader(nc.jetstream(), names, manifest).load([0, 1])
    train_set, _ = data.split(arrays, [s.records for s in manifest.shards], req.eval_fraction)
    torch.manual_seed(req.seed)
    model = build_model(ModelSpec(factory=req.factory, kwargs=kwargs))
    opt = torch.optim.Adam(model.parameters(), lr=req.lr)
    expected = []
    for batch in DatasetReader.epoch_batches(train_set, batch_size=16, seed=req.seed, epoch=0, drop_last=True):
        tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        opt.zero_grad()
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
        if len(expected) == 8:
            break
    np.testing.assert_allclose(result.losses, expected, rtol=1e-4, atol=1e-5)
    assert "eval_loss" in job.metrics


async def test_a_killed_node_regroups_resumes_and_completes(
    ingest_service: IngestService, spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    nodes = await trainers(spawn, nats_url, names, 3)
    await ingest(nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=4), progress=False)
    kwargs = {"inputs": 64, "classes": 10, "hidden": [512, 512]}
    req = TrainRequest(
        model="digits",
        factory="zoo.classifier:mlp",
        kwargs=kwargs,
        dataset="digits",
        nodes=2,
        min_nodes=1,
        epochs=40,
        batch_size=64,
        lr=1e-3,
        checkpoint_every=25,
        wait_nodes_s=3,
        collective_timeout_s=10,
    )
    accepted = await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    assert accepted.nodes_available == 3
    kv = await nc.jetstream().key_value(names.jobs_bucket)

    async def past_a_checkpoint() -> TrainProgress | None:
        try:
            progress = msgspec.json.decode(
                (await kv.get(f"progress.{accepted.job_id}")).value or b"", type=TrainProgress
            )
        except Exception:
            return None
        return progress if progress.epoch >= 2 else None

    await eventually(past_a_checkpoint, 120, "training to pass a checkpoint")
    job = msgspec.json.decode((await kv.get(f"job.{accepted.job_id}")).value or b"", type=TrainJob)
    victim_id = job.members[1]
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("trainer"))
    victim_pid = int(next(p for p in pings if p.id == victim_id).metadata["pid"])
    assert victim_pid in {n.pid for n in nodes}
    os.kill(victim_pid, signal.SIGKILL)  # the whole node: agent and (through PDEATHSIG) its rank

    final = await train_follow(nc, names, accepted.job_id)
    assert final.state == "complete", final.error
    assert final.attempt >= 2 and final.restarts >= 1 and victim_id not in final.members
    assert final.metrics["eval_accuracy"] >= 0.9
    checkpoint = await kv.get(f"checkpoint.{accepted.job_id}")
    assert checkpoint.value


async def train_follow(nc: NatsClient, names: Names, job_id: str) -> TrainJob:
    kv = await nc.jetstream().key_value(names.jobs_bucket)

    async def ended() -> TrainJob | None:
        job = msgspec.json.decode((await kv.get(f"job.{job_id}")).value or b"", type=TrainJob)
        return job if job.state in ("complete", "failed") else None

    return await eventually(ended, 240, "the job to end")


async def test_bad_training_requests_end_with_a_clear_error(
    ingest_service: IngestService, spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    await trainers(spawn, nats_url, names, 2)
    await ingest(nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=4), progress=False)
    base = {**DIGITS_MLP, "model": "m", "dataset": "digits"}
    cases = [
        ({"dataset": "nothing"}, "dataset nothing: no dataset named 'nothing'"),
        ({"factory": "nowhere.module:f"}, "model factory 'nowhere.module:f' refused: .* trusted packages zoo"),
        ({"factory": "zoo.nowhere:f"}, r"cannot import zoo\.nowhere"),
        ({"kwargs": {"inputs": -1, "classes": 10}}, "model factory zoo.classifier:mlp failed"),
        ({"nodes": 3, "batch_size": 64}, "must divide evenly over 3 nodes"),
    ]
    for change, message in cases:
        with pytest.raises(BadRequest, match=message):
            await request(nc, names.train_submit, TrainRequest(**(base | change)), TrainAccepted, timeout_s=30)  # type: ignore[arg-type]
    waiting = await train(
        nc,
        names,
        TrainRequest(**(base | {"nodes": 3, "batch_size": 60, "wait_nodes_s": 2})),  # type: ignore[arg-type]
        show=False,
    )
    assert waiting.state == "failed" and "waited 2s for 3 trainer nodes (at least 3); 2 joined" in waiting.error
    nan = await train(nc, names, TrainRequest(**(base | {"optimizer": "sgd", "lr": 1e12})), show=False)  # type: ignore[arg-type]
    assert nan.state == "failed" and "loss became" in nan.error and nan.restarts == 0


async def test_a_failed_job_resumes_from_its_checkpoint_with_the_cli(
    ingest_service: IngestService, spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    nodes = await trainers(spawn, nats_url, names, 2)
    await ingest(nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=4), progress=False)
    kwargs = {"inputs": 64, "classes": 10, "hidden": [512, 512]}
    req = TrainRequest(
        model="digits",
        factory="zoo.classifier:mlp",
        kwargs=kwargs,
        dataset="digits",
        nodes=1,
        epochs=30,
        batch_size=64,
        checkpoint_every=25,
        max_restarts=0,
    )
    accepted = await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    kv = await nc.jetstream().key_value(names.jobs_bucket)

    async def checkpointed() -> bool:
        try:
            return bool((await kv.get(f"checkpoint.{accepted.job_id}")).value)
        except Exception:
            return False

    await eventually(checkpointed, 120, "a checkpoint")
    job = msgspec.json.decode((await kv.get(f"job.{accepted.job_id}")).value or b"", type=TrainJob)
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("trainer"))
    os.kill(int(next(p for p in pings if p.id == job.members[0]).metadata["pid"]), signal.SIGKILL)
    failed = await train_follow(nc, names, accepted.job_id)
    assert failed.state == "failed" and "gave up after 0 restarts" in failed.error

    from tests.helpers import ROOT
    from tests.test_cli import AIMESH, _clean_env

    out = await asyncio.to_thread(
        subprocess.run,
        [*AIMESH, "train", "--resume", accepted.job_id, "--json", "--nats-url", nats_url, "--prefix", names.prefix],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["job"]["state"] == "complete" and result["job"]["attempt"] == failed.attempt + 1
    assert result["model"]["model"] == "digits" and result["model"]["metrics"]["eval_accuracy"] >= 0.9
    common = ["--nats-url", nats_url, "--prefix", names.prefix]
    alias = subprocess.run(
        [*AIMESH, "models", "alias", "digits@1", "stable", *common],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alias.returncode == 0, alias.stderr
    shown = subprocess.run(
        [*AIMESH, "models", "show", "digits@stable", *common],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "model digits@1 (latest, stable)" in shown.stdout
    assert len([n for n in nodes if n.proc.poll() is None]) == 1
