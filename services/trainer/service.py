"""The trainer agent: NATS, heartbeats and job control; training itself runs in child processes.

As torchelastic's agent runs its workers, an agent runs each attempt's rank in a child process
(``services.trainer.worker``): collectives block the child, never this event loop, and a failed
attempt is a dead child, not a wedged service.

Rendezvous over the ``<prefix>-jobs`` bucket, every change a compare-and-set on ``job.<id>``:

1. ``submit`` validates the request (dataset, sizes, and the model: a factory only from the
   trusted packages, ``zoo`` and ``model_packages``, checked before any import; kwargs plain data)
   and creates the job ``forming``, attempt 1, with a deadline.
2. Idle agents watching the bucket join by appending themselves to ``members``; the index is the
   rank.  The join that completes the set moves the job to ``starting``.  At the deadline an
   agent moves it to ``starting`` with the members it has, if they are at least ``min_nodes``,
   or to ``failed`` saying what it waited for.
3. The leader (rank 0) picks a free port for torch's TCPStore and moves the job to ``running``
   with ``master`` = its address; every member starts its rank.  Rank 0's store listens on that
   address only (``TrainerConfig.host``), not on every interface (``rendezvous.py``).
4. A rank that exits non-zero, or a member whose heartbeat expires, moves the job back to
   ``forming`` (attempt + 1, members cleared) within the restart budget; the survivors stop their
   ranks and join again; the new attempt resumes from the last checkpoint.  Past the budget, or
   on an error a retry cannot fix (NaN loss), the job is ``failed`` with the reason.
5. When rank 0 exits 0 after registering the model, its agent marks the job ``complete``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import tracing
from shared.actor import Call
from shared.clock import rfc3339_now
from shared.config import TrainerConfig, load_trainer_config
from shared.datasets import get_manifest, parse_ref
from shared.errors import BadRequest, NotFound
from shared.kv import follow
from shared.names import check_token
from shared.natsserver import die_with_parent
from shared.registry import artifacts
from shared.schemas import GpuStats, TrainAccepted, TrainerNode, TrainJob, TrainRequest, TrainResult
from shared.service import Service

log = logging.getLogger(__name__)
_job = msgspec.json.Decoder(TrainJob)
_node = msgspec.json.Decoder(TrainerNode)
_result = msgspec.json.Decoder(TrainResult)
_json = msgspec.json.Encoder()
TERMINAL = ("complete", "failed")
RESULT_GRACE_S = 2.0  # how long a crashed rank's agent waits for another rank's verdict


class TrainerService(Service):
    name = "trainer"
    description = "A training node: coordinates data- and model-parallel PyTorch runs over NATS."

    trainer_config: TrainerConfig
    jobs: KeyValue
    nodes: KeyValue

    async def setup(self) -> None:
        self.trainer_config = load_trainer_config()
        self.jobs = await self.ensure_kv(self.names.jobs_bucket, history=1)
        self.nodes = await self.ensure_kv(self.names.trainers_bucket, ttl_s=self.trainer_config.node_ttl_s)
        await self.ensure_kv(self.names.registry_bucket)
        await artifacts(self.js, self.names, self.config.js_replicas)
        self._known: dict[str, tuple[TrainJob, int]] = {}
        self._child: asyncio.subprocess.Process | None = None
        self._child_job: tuple[str, int, int] | None = None  # (job, attempt, rank)
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.add_actor("submit", self.names.train_submit, self.submit, TrainRequest, max_concurrency=4)

    async def after_start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat()),
            loop.create_task(follow(self.jobs, "job.*", self._on_job)),
            loop.create_task(self._tick()),
        ]

    def gpu_stats(self) -> list[GpuStats]:
        # The agent itself never loads torch (it starts fast); once it has (device detection),
        # the device figures cover every process on the GPU, its ranks included.
        if "torch" not in sys.modules:
            return []
        from zoo.devices import device_stats

        return device_stats()

    def metadata(self) -> dict[str, str]:
        job = self._child_job
        return {"job": f"{job[0]}#{job[1]} rank {job[2]}"} if job else {}

    async def stop_intake(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close_resources(self) -> None:
        if self._child is not None and self._child.returncode is None:
            await self._stop_child("this node is shutting down")
        try:
            await self.nodes.delete(self.instance_id)
        except Exception:
            log.debug("could not remove the heartbeat", exc_info=True)

    # -- submit --------------------------------------------------------------------------------
    async def submit(self, req: TrainRequest, _: Call) -> TrainAccepted:
        if req.resume:
            return await self._resume(req.resume)
        try:
            check_token(req.model, "model name")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if req.parallel not in ("dp", "pp"):
            raise BadRequest(f"parallel must be dp or pp (got {req.parallel!r})")
        if req.nodes < 1 or (req.parallel == "pp" and req.nodes < 2):
            raise BadRequest("nodes must be ≥ 1 (≥ 2 for pp: one pipeline stage per node)")
        min_nodes = req.min_nodes or req.nodes
        if not 1 <= min_nodes <= req.nodes or (req.parallel == "pp" and min_nodes != req.nodes):
            raise BadRequest(f"min_nodes must be between 1 and nodes ({req.nodes}); pp needs all its stages")
        if req.parallel == "dp" and req.batch_size % req.nodes:
            raise BadRequest(f"batch size {req.batch_size} must divide evenly over {req.nodes} nodes")
        if req.parallel == "pp" and req.batch_size % req.microbatches:
            raise BadRequest(f"batch size {req.batch_size} must divide into {req.microbatches} micro-batches")
        if req.epochs < 1 or req.batch_size < 1 or req.lr <= 0:
            raise BadRequest("epochs and batch size must be ≥ 1 and lr > 0")
        # The model first: a factory outside the trusted packages is refused before anything else.
        await asyncio.to_thread(_check_factory, req, self.config.model_packages)
        dataset, version = parse_ref(req.dataset)
        try:
            manifest = await get_manifest(self.js, self.names, dataset, version)
        except NotFound as exc:
            raise BadRequest(f"dataset {req.dataset}: {exc.description}") from None
        if req.parallel == "dp" and len(manifest.shards) < min_nodes:
            raise BadRequest(
                f"dataset {req.dataset} has {len(manifest.shards)} shards, fewer than the "
                f"{min_nodes} nodes: ingest it with --shards ≥ {req.nodes}"
            )
        req = msgspec.structs.replace(req, dataset=f"{manifest.dataset}@{manifest.version}", min_nodes=min_nodes)
        job_id = f"{req.model}-{int(time.time() * 1000):x}"
        ids = tracing.current_ids()
        now = rfc3339_now()
        job = TrainJob(
            job_id=job_id,
            request=req,
            state="forming",
            forming_deadline=time.time() + req.wait_nodes_s,
            created_at=now,
            updated_at=now,
            trace_id=ids[0] if ids else "",
        )
        await self.jobs.create(f"job.{job_id}", _json.encode(job))
        idle = sum(1 for n in await self._nodes() if n.state == "idle")
        return TrainAccepted(job_id=job_id, state=job.state, nodes_available=idle)

    async def _resume(self, job_id: str) -> TrainAccepted:
        """A failed job forms again (restart budget renewed); its ranks resume from the checkpoint."""
        try:
            entry = await self.jobs.get(f"job.{job_id}")
        except KeyNotFoundError:
            raise BadRequest(f"no training job {job_id}") from None
        job = _job.decode(entry.value or b"")
        if job.state != "failed":
            raise BadRequest(f"job {job_id} is {job.state}: only a failed job can be resumed")
        if not await self._cas(
            job,
            entry.revision or 0,
            state="forming",
            attempt=job.attempt + 1,
            members=[],
            master="",
            world=0,
            restarts=0,
            error="",
            forming_deadline=time.time() + job.request.wait_nodes_s,
        ):
            raise BadRequest(f"job {job_id} changed while resuming it; try again")
        idle = sum(1 for n in await self._nodes() if n.state == "idle")
        return TrainAccepted(job_id=job_id, state="forming", nodes_available=idle)

    # -- the control loop ----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            job = self._child_job
            node = TrainerNode(
                instance=self.instance_id,
                host=socket.gethostname(),
                address=self.trainer_config.host,
                pid=os.getpid(),
                state="busy" if job else "idle",
                job=job[0] if job else "",
                device=_device_name(),
            )
            try:
                await self.nodes.put(self.instance_id, _json.encode(node))
            except Exception:
                log.warning("heartbeat failed", exc_info=True)
            await asyncio.sleep(self.trainer_config.heartbeat_s)

    async def _on_job(self, entry: KeyValue.Entry) -> None:
        if not entry.value:
            return
        job = _job.decode(entry.value)
        self._known[job.job_id] = (job, entry.revision or 0)
        await self._act(job, entry.revision or 0)

    async def _tick(self) -> None:
        """Deadlines and lost members: what no watch event announces."""
        while True:
            await asyncio.sleep(1.0)
            for job, revision in list(self._known.values()):
                try:
                    await self._check_timers(job, revision)
                except Exception:
                    log.warning("job %s: timer check failed", job.job_id, exc_info=True)

    async def _act(self, job: TrainJob, revision: int) -> None:
        async with self._lock:
            mine = self._child_job
            if mine and mine[0] == job.job_id and (job.state in TERMINAL or job.attempt != mine[1]):
                await self._stop_child(f"job {job.job_id} moved to {job.state} attempt {job.attempt}")
            if job.state in TERMINAL:
                self._known.pop(job.job_id, None)
                return
            if job.state == "forming":
                await self._join(job, revision)
            elif job.state == "starting" and job.members and job.members[0] == self.instance_id:
                port = _free_port(self.trainer_config.host)
                master = f"{self.trainer_config.host}:{port}"
                await self._cas(job, revision, state="running", master=master)
            elif job.state == "running" and self.instance_id in job.members and self._child is None:
                await self._start_child(job, job.members.index(self.instance_id))

    async def _join(self, job: TrainJob, revision: int) -> None:
        if self._child_job is not None or self.instance_id in job.members or len(job.members) >= job.request.nodes:
            return
        members = [*job.members, self.instance_id]
        complete = len(members) == job.request.nodes
        changes: dict[str, Any] = {"members": members}
        if complete:
            changes |= {"state": "starting", "world": len(members)}
        if await self._cas(job, revision, **changes):
            self._child_job = (job.job_id, job.attempt, len(members) - 1)  # reserved: we are busy now
            log.info("joined %s attempt %d as rank %d", job.job_id, job.attempt, len(members) - 1)

    async def _check_timers(self, job: TrainJob, revision: int) -> None:
        if job.state == "forming" and time.time() > job.forming_deadline:
            want, least = job.request.nodes, job.request.min_nodes or job.request.nodes
            if len(job.members) >= least:
                await self._cas(job, revision, state="starting", world=len(job.members))
            else:
                await self._cas(
                    job,
                    revision,
                    state="failed",
                    error=(
                        f"waited {job.request.wait_nodes_s:g}s for {want} trainer nodes (at least {least}); "
                        f"{len(job.members)} joined: start more trainers (aimesh run trainer) or lower --nodes"
                    ),
                )
        elif job.state in ("starting", "running"):
            # Any agent may notice: a job whose only node died has no member left to say so.
            alive = {n.instance for n in await self._nodes()}
            lost = [m for m in job.members if m not in alive]
            if lost:
                await self._regroup(job, revision, f"node {lost[0]} stopped sending heartbeats")

    # -- children --------------------------------------------------------------------------------
    async def _start_child(self, job: TrainJob, rank: int) -> None:
        env = os.environ | {
            "AIMESH_NATS_URL": self.config.nats_url,
            "AIMESH_PREFIX": self.config.prefix,
            # The rank refuses factories outside this node's trusted packages, as submit does.
            "AIMESH_MODEL_PACKAGES": json.dumps(self.config.model_packages),
        }
        args = [
            sys.executable,
            "-m",
            "services.trainer.worker",
            "--job",
            job.job_id,
            "--attempt",
            str(job.attempt),
            "--rank",
            str(rank),
            "--world",
            str(job.world),
            "--master",
            job.master,
        ]
        self._child = await asyncio.create_subprocess_exec(*args, env=env, preexec_fn=die_with_parent)
        self._child_job = (job.job_id, job.attempt, rank)
        log.info(
            "started rank %d/%d of %s attempt %d (pid %d)", rank, job.world, job.job_id, job.attempt, self._child.pid
        )
        asyncio.get_running_loop().create_task(self._await_child(self._child, job.job_id, job.attempt, rank))

    async def _await_child(self, proc: asyncio.subprocess.Process, job_id: str, attempt: int, rank: int) -> None:
        code = await proc.wait()
        async with self._lock:
            if self._child is proc:
                self._child = None
                self._child_job = None
            entry = await self.jobs.get(f"job.{job_id}")
            job, revision = _job.decode(entry.value or b""), entry.revision or 0
            if job.state != "running" or job.attempt != attempt:
                return  # already moved on (we were stopped, or another rank reported first)
            result = await self._result(job_id, attempt)
            if result is None and code != 0:
                # A rank that died of a peer's exit (a closed collective) may be seen before the
                # peer's own verdict is stored: give it a moment before calling it a crash.
                result = await self._wait_result(job_id, attempt, RESULT_GRACE_S)
            if code == 0 and rank == 0 and result is not None and result.ok:
                await self._cas(
                    job,
                    revision,
                    state="complete",
                    model_version=result.model_version,
                    metrics=result.metrics,
                    error="",
                )
            elif result is not None and not result.ok:
                await self._cas(job, revision, state="failed", error=result.error)
            elif code != 0 or rank == 0:
                await self._regroup(
                    job,
                    revision,
                    f"rank {rank} (node {self.instance_id}) exited with code {code}"
                    + ("" if code else " but no result"),
                )

    async def _regroup(self, job: TrainJob, revision: int, why: str) -> None:
        if job.restarts >= job.request.max_restarts:
            await self._cas(
                job, revision, state="failed", error=f"{why}; gave up after {job.restarts} restarts (max_restarts)"
            )
            return
        log.warning("job %s attempt %d failed: %s; re-forming", job.job_id, job.attempt, why)
        await self._cas(
            job,
            revision,
            state="forming",
            attempt=job.attempt + 1,
            members=[],
            master="",
            world=0,
            restarts=job.restarts + 1,
            error=why,
            forming_deadline=time.time() + job.request.wait_nodes_s,
        )

    async def _stop_child(self, why: str) -> None:
        proc = self._child
        self._child, self._child_job = None, None
        if proc is None or proc.returncode is not None:
            return
        log.info("stopping rank (pid %d): %s", proc.pid, why)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    # -- records ---------------------------------------------------------------------------------
    async def _cas(self, job: TrainJob, revision: int, **changes: Any) -> bool:
        updated = msgspec.structs.replace(job, updated_at=rfc3339_now(), **changes)
        try:
            await self.jobs.update(f"job.{job.job_id}", _json.encode(updated), last=revision)
            return True
        except KeyWrongLastSequenceError:
            return False  # someone else changed it first; the watch brings the new state

    async def _result(self, job_id: str, attempt: int) -> TrainResult | None:
        try:
            return _result.decode((await self.jobs.get(f"result.{job_id}.{attempt}")).value or b"")
        except KeyNotFoundError:
            return None

    async def _wait_result(self, job_id: str, attempt: int, within_s: float) -> TrainResult | None:
        deadline = time.monotonic() + within_s
        while (result := await self._result(job_id, attempt)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return result

    async def _nodes(self) -> list[TrainerNode]:
        out: list[TrainerNode] = []
        try:
            keys = await self.nodes.keys()
        except Exception:
            return out
        for key in keys:
            try:
                out.append(_node.decode((await self.nodes.get(key)).value or b""))
            except KeyNotFoundError:
                continue
        return out


def _check_factory(req: TrainRequest, packages: list[str]) -> None:
    """Refuse a factory outside the trusted packages, or kwargs that are not plain data, before
    anything is imported; then build the model once on the meta device (no memory for weights)
    to check that it builds.  A factory that cannot build on meta is built for real: only a
    trusted package's factory gets this far, and the zoo's bound their sizes first."""
    from zoo import ModelSpec, build_model, check_factory, check_kwargs

    check_factory(req.factory, packages)
    check_kwargs(req.kwargs)
    spec = ModelSpec(factory=req.factory, kwargs=req.kwargs)
    try:
        build_model(spec, packages, device="meta")
    except BadRequest:
        build_model(spec, packages)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _device_name() -> str:
    try:
        import torch

        return f"cuda×{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"
