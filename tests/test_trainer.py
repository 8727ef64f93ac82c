"""Training across real trainer processes: DP equivalence, PP equivalence, faults, bad requests."""

from __future__ import annotations

import asyncio
import itertools
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
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from aimesh.jobs import ingest, train
from services.ingest.service import IngestService
from services.trainer import data
from shared.client import request
from shared.config import IngestConfig, MeshConfig
from shared.datasets import DatasetReader
from shared.discovery import discover
from shared.errors import BadRequest
from shared.names import Names
from shared.registry import get_version, registry_kv
from shared.schemas import (
    DatasetManifest,
    IngestRequest,
    MicroPing,
    TrainAccepted,
    TrainJob,
    TrainRequest,
    TrainResult,
)
from tests.helpers import ServiceProcess, eventually
from tests.training import (
    assert_resumed_from,
    assert_trained_the_rest,
    attempt_record,
    checkpoint_of,
    first_attempt_record,
)
from zoo import ModelSpec, build_model
from zoo.lm import CHAT_TEMPLATE, lm_loss

pytestmark = pytest.mark.slow

EPOCHS_WORLD_CHANGE = 20
DIGITS_MLP = {"factory": "zoo.classifier:mlp", "kwargs": {"inputs": 64, "classes": 10}}


@pytest.fixture
async def ingest_service(mesh_config: MeshConfig, tmp_path: Path) -> AsyncIterator[IngestService]:
    # The corpus a test writes is read from there.
    async with IngestService(mesh_config, IngestConfig(roots=[str(tmp_path)])) as service:
        yield service


async def trainers(spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, n: int) -> list[ServiceProcess]:
    procs = [spawn("services.trainer", OTEL_SDK_DISABLED="false", AIMESH_TRAINER_NODE_TTL_S="3") for _ in range(n)]
    await asyncio.gather(*(p.wait_ready(nats_url, names.micro_name("trainer"), timeout_s=60) for p in procs))
    return procs


@pytest.mark.timeout(300)
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
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    for job in (two, one):
        # Step for step, the run's loss is plain single-process torch's on the same global batch
        # (DDP averages the ranks' half-batch gradients: the full batch's mean-loss gradient), past
        # the first epoch's end; and every rank ends with the same weights.
        world = job.world
        steps = data.steps_per_epoch(manifest, world, "dp", job.request.batch_size, job.request.eval_fraction)
        result = await result_of(kv, job)
        expected = await reference_dp_losses(nc, names, manifest, job.request, world, steps + 5)
        np.testing.assert_allclose(result.losses[: steps + 5], expected, rtol=1e-4, atol=1e-5)
        record = await attempt_record(kv, job.job_id, job.attempt)
        assert record.world == world and len(record.weights) == world
        assert len(set(record.weights)) == 1, f"the ranks ended with different weights: {record.weights}"
    assert two.metrics["eval_accuracy"] >= 0.9 and one.metrics["eval_accuracy"] >= 0.9
    kv = await registry_kv(nc.jetstream(), names)
    first, latest = await get_version(kv, "digits", "1"), await get_version(kv, "digits")
    assert (first.version, latest.version) == ("1", "2")
    assert first.dataset == "digits@1" and first.job_id == two.job_id and first.trace_id == two.trace_id
    assert first.dataset_trace_id == manifest.trace_id and first.hyperparameters["nodes"] == 2


async def reference_dp_losses(
    nc: NatsClient, names: Names, manifest: DatasetManifest, req: TrainRequest, world: int, n: int
) -> list[float]:
    """The first ``n`` losses of plain single-process torch (Adam, mean cross-entropy) on the global
    batches of a ``world``-rank data-parallel run: each step, every rank's batch in rank order."""
    reader = DatasetReader(nc.jetstream(), names, manifest)
    shares = []
    for rank in range(world):
        shards = data.train_shards(manifest, rank, world, "dp")
        arrays = await reader.load(shards)
        shares.append(data.split(arrays, [manifest.shards[s].records for s in shards], req.eval_fraction)[0])
    steps = data.steps_per_epoch(manifest, world, "dp", req.batch_size, req.eval_fraction)
    torch.manual_seed(req.seed)
    model = build_model(ModelSpec(factory=req.factory, kwargs=req.kwargs))
    opt = torch.optim.Adam(model.parameters(), lr=req.lr)
    losses: list[float] = []
    for epoch in itertools.count():
        streams = [
            data.rank_batches(share, req.batch_size // world, data.shuffle_seed(req.seed, rank, "dp"), epoch)
            for rank, share in enumerate(shares)
        ]
        for _ in range(steps):
            parts = [next(stream) for stream in streams]
            x = torch.from_numpy(np.concatenate([p["x"] for p in parts]))
            y = torch.from_numpy(np.concatenate([p["y"] for p in parts]))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) == n:
                return losses
    raise AssertionError("unreachable")


async def result_of(kv: KeyValue, job: TrainJob) -> TrainResult:
    return msgspec.json.decode((await kv.get(f"result.{job.job_id}.{job.attempt}")).value or b"", type=TrainResult)


@pytest.mark.timeout(300)
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
    # The version is registered with the chat template the zoo's LM declares (/v1/chat/completions).
    registered = await get_version(await registry_kv(nc.jetstream(), names), "tiny-lm", result.model_version)
    assert registered.chat_template == CHAT_TEMPLATE


@pytest.mark.timeout(420)
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
    seen = await eventually(lambda: checkpoint_of(kv, accepted.job_id), 120, "a checkpoint")
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
    # The first attempt after the kill that got as far as recording itself (under load one may fail
    # before it does, and the job regroups again) had two nodes again (the spare joined) and
    # started at the checkpoint, not at step 0; the last attempt trained only what was left.
    second = await first_attempt_record(kv, accepted.job_id, range(2, final.attempt + 1))
    assert second.world == 2 and second.checkpoint_world == 2
    assert_resumed_from(second, seen)
    assert_trained_the_rest(await attempt_record(kv, accepted.job_id, final.attempt), req.epochs)


@pytest.mark.timeout(420)
async def test_a_two_node_job_that_loses_a_node_resumes_alone_from_its_checkpoint(
    ingest_service: IngestService, spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    await trainers(spawn, nats_url, names, 2)
    # Three shards: rank 0 reads two, rank 1 one, so an epoch has fewer steps at world 2 than at 1
    # and the resume has to scale the checkpoint's step.
    _, manifest = await ingest(
        nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=3), progress=False
    )
    assert manifest is not None
    req = TrainRequest(
        model="digits",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 64, "classes": 10, "hidden": [512, 512]},
        dataset="digits",
        nodes=2,
        min_nodes=1,
        epochs=EPOCHS_WORLD_CHANGE,
        batch_size=64,
        lr=1e-3,
        checkpoint_every=10,
        wait_nodes_s=3,
        collective_timeout_s=10,
    )
    steps = {w: data.steps_per_epoch(manifest, w, "dp", req.batch_size, req.eval_fraction) for w in (1, 2)}
    assert steps[1] != steps[2]
    accepted = await request(nc, names.train_submit, req, TrainAccepted, timeout_s=30)
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    job = await eventually(lambda: job_in(kv, accepted.job_id, "running"), 120, "the job to run")
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("trainer"))
    victim = int(next(p for p in pings if p.id == job.members[1]).metadata["pid"])
    seen = await eventually(lambda: checkpoint_of(kv, accepted.job_id), 120, "a checkpoint")
    os.kill(victim, signal.SIGKILL)  # the whole node: agent and (through PDEATHSIG) its rank

    final = await train_follow(nc, names, accepted.job_id)
    assert final.state == "complete", final.error
    assert final.world == 1 and final.restarts >= 1
    second = await attempt_record(kv, accepted.job_id, 2)
    assert (second.world, second.steps_per_epoch) == (1, steps[1])
    assert (second.checkpoint_world, second.checkpoint_steps_per_epoch) == (2, steps[2])
    assert_resumed_from(second, seen)
    assert_trained_the_rest(await attempt_record(kv, accepted.job_id, final.attempt), req.epochs)


async def job_in(kv: KeyValue, job_id: str, state: str) -> TrainJob | None:
    job = msgspec.json.decode((await kv.get(f"job.{job_id}")).value or b"", type=TrainJob)
    return job if job.state == state else None


async def job_past(kv: KeyValue, job_id: str, attempt: int) -> TrainJob | None:
    """The job once an attempt after ``attempt`` has ended."""
    job = msgspec.json.decode((await kv.get(f"job.{job_id}")).value or b"", type=TrainJob)
    return job if job.attempt > attempt and job.state in ("complete", "failed") else None


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
        # Ids from outside become keys and subjects: no dots, wildcards, spaces or unbounded lengths.
        ({"submission_id": "a.b"}, "submission id 'a.b' must be letters, digits"),
        ({"submission_id": "job.>"}, "submission id 'job.>' must be letters, digits"),
        ({"submission_id": "two words"}, "submission id 'two words' must be letters, digits"),
        ({"submission_id": "x" * 65}, "submission id must be at most 64 characters"),
        ({"resume": "*"}, "job id '\\*' must be letters, digits"),
    ]
    for change, message in cases:
        with pytest.raises(BadRequest, match=message):
            await request(nc, names.train_submit, TrainRequest(**(base | change)), TrainAccepted, timeout_s=30)  # type: ignore[arg-type]
    # One submission id names one job: resends (a lost reply, a 503 after the write landed) answer it.
    resend = TrainRequest(**(base | {"nodes": 3, "batch_size": 60, "wait_nodes_s": 2, "submission_id": "try-1"}))  # type: ignore[arg-type]
    sends = [request(nc, names.train_submit, resend, TrainAccepted, timeout_s=30) for _ in range(2)]
    assert {accepted.job_id for accepted in await asyncio.gather(*sends)} == {"m-try-1"}
    with pytest.raises(BadRequest, match="submission id try-1 already names a job submitted with a different"):
        await request(nc, names.train_submit, msgspec.structs.replace(resend, epochs=2), TrainAccepted, timeout_s=30)
    waiting = await train(nc, names, resend, show=False)  # a third send: follows the same job
    assert waiting.job_id == "m-try-1" and waiting.attempt == 1
    assert waiting.state == "failed" and "waited 2s for 3 trainer nodes (at least 3); 2 joined" in waiting.error
    nan = await train(nc, names, TrainRequest(**(base | {"optimizer": "sgd", "lr": 1e12})), show=False)  # type: ignore[arg-type]
    assert nan.state == "failed" and "loss became" in nan.error and nan.restarts == 0


@pytest.mark.timeout(420)
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
        except KeyNotFoundError:  # none yet
            return False

    await eventually(checkpointed, 120, "a checkpoint")
    job = msgspec.json.decode((await kv.get(f"job.{accepted.job_id}")).value or b"", type=TrainJob)
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name("trainer"))
    os.kill(int(next(p for p in pings if p.id == job.members[0]).metadata["pid"]), signal.SIGKILL)
    failed = await train_follow(nc, names, accepted.job_id)
    assert failed.state == "failed" and "gave up after 0 restarts" in failed.error
    seen = await checkpoint_of(kv, accepted.job_id)
    assert seen is not None

    # A checkpoint that is recorded but cannot be read fails the job with the cause; it never
    # silently starts again from step 0.
    original = (await kv.get(f"checkpoint.{accepted.job_id}")).value or b""
    broken = msgspec.structs.replace(seen, objects=[f"ckpt/{accepted.job_id}/gone-r0"])
    await kv.put(f"checkpoint.{accepted.job_id}", msgspec.json.encode(broken))
    resume = msgspec.structs.replace(req, resume=accepted.job_id)
    await request(nc, names.train_submit, resume, TrainAccepted, timeout_s=30)
    refused = await eventually(lambda: job_past(kv, accepted.job_id, failed.attempt), 120, "the resume to fail")
    assert refused.state == "failed", refused
    assert (
        f"checkpoint ckpt/{accepted.job_id}/gone-r0 (attempt 1, epoch {seen.epoch} step {seen.step})" in refused.error
    )
    assert "missing from the artifacts store: cannot resume" in refused.error and "gave up" not in refused.error
    await kv.put(f"checkpoint.{accepted.job_id}", original)

    from tests.helpers import AIMESH, ROOT, clean_env

    out = await asyncio.to_thread(
        subprocess.run,
        [*AIMESH, "train", "--resume", accepted.job_id, "--json", "--nats-url", nats_url, "--prefix", names.prefix],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr + out.stdout  # --json: a failed job's record is on stdout
    result = json.loads(out.stdout)
    assert result["job"]["state"] == "complete" and result["job"]["attempt"] == refused.attempt + 1
    resumed = await attempt_record(kv, accepted.job_id, refused.attempt + 1)
    assert resumed.checkpoint == seen.objects[0] and resumed.world == resumed.checkpoint_world == 1
    assert_resumed_from(resumed, seen)
    assert_trained_the_rest(resumed, req.epochs)
    assert result["model"]["model"] == "digits" and result["model"]["metrics"]["eval_accuracy"] >= 0.9
    common = ["--nats-url", nats_url, "--prefix", names.prefix]
    alias = subprocess.run(
        [*AIMESH, "models", "alias", "digits@1", "stable", *common],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alias.returncode == 0, alias.stderr
    shown = subprocess.run(
        [*AIMESH, "models", "show", "digits@stable", *common],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "model digits@1 (latest, stable)" in shown.stdout
    assert len([n for n in nodes if n.proc.poll() is None]) == 1
