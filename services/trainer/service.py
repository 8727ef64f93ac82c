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
   address only (``TrainerConfig.host``), not on every interface (``store.py``).
4. A rank that exits non-zero, or a member whose heartbeat expires, moves the job back to
   ``forming`` (attempt + 1, members cleared) within the restart budget; the survivors stop their
   ranks and join again; the new attempt resumes from the last checkpoint.  Past the budget, or
   on an error a retry cannot fix (NaN loss), the job is ``failed`` with the reason.
5. When rank 0 exits 0 after registering the model, its agent marks the job ``complete``.

The checks of 1 are ``submission.py``; the decisions of 2, 4 and 5 are ``rendezvous.py`` (pure,
tested directly); this module gathers the state they need and applies the changes they return.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any, Self

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.trainer import rendezvous, submission
from shared import tracing, transient
from shared.actor import ActorConfig, Call
from shared.clock import rfc3339_now
from shared.cluster import route_address
from shared.config import MeshConfig, TrainerConfig, load_trainer_config
from shared.datasets import get_manifest, parse_ref
from shared.errors import BadRequest, NotFound, Unavailable
from shared.kv import entries
from shared.names import check_name, job_key, job_keys, result_key, trainer_node_key
from shared.natsserver import die_with_parent
from shared.outage import Outage
from shared.registry import artifacts
from shared.schemas import GpuStats, TrainAccepted, TrainerNode, TrainJob, TrainRequest, TrainResult
from shared.service import Service

log = logging.getLogger(__name__)
_job = msgspec.json.Decoder(TrainJob)
_node = msgspec.json.Decoder(TrainerNode)
_result = msgspec.json.Decoder(TrainResult)
_json = msgspec.json.Encoder()
RESULT_GRACE_S = 2.0  # how long a crashed rank's agent waits for another rank's verdict


class TrainerService(Service):
    name = "trainer"
    description = "A training node: coordinates data- and model-parallel PyTorch runs over NATS."

    jobs: KeyValue
    nodes: KeyValue
    _beats: KeyValue  # the same bucket, with a heartbeat-long ack timeout

    def __init__(self, config: MeshConfig, trainer: TrainerConfig | None = None) -> None:
        super().__init__(config)
        self.trainer_config = trainer or TrainerConfig()
        self._known: dict[str, tuple[TrainJob, int]] = {}
        self._child: asyncio.subprocess.Process | None = None
        self._child_job: tuple[str, int, int] | None = None  # (job, attempt, rank)
        self._lock = asyncio.Lock()
        self._beat_outage = Outage(log, "heartbeat", "retrying every beat")
        # Missing from the listings for a whole TTL more (a node is listed until its last beat is
        # a TTL old): a bucket that refuses one node's writes for seconds after a partition heals
        # must not regroup a job whose ranks are all alive.
        trainer = self.trainer_config
        self._absences = rendezvous.Absences(grace_s=max(2 * trainer.heartbeat_s, trainer.node_ttl_s))

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        return cls(config, load_trainer_config(env))

    async def setup(self) -> None:
        self.address = self.trainer_config.host or self._nats_route_address()
        log.info("advertising %s to the other trainer nodes (rank 0's store, gloo)", self.address)
        self.jobs = await self.ensure_kv(self.names.jobs_bucket, history=1)
        self.nodes = await self.ensure_kv(self.names.trainers_bucket, ttl_s=self.trainer_config.node_ttl_s)
        # Beats wait a heartbeat for their ack, not JetStream's 5 s: a put stuck on a bucket that is
        # electing its leader must not hold back the beats that would be stored once it has one.
        beat_timeout_s = max(self.trainer_config.heartbeat_s, 0.5)
        self._beats = await self.nc.jetstream(timeout=beat_timeout_s).key_value(self.names.trainers_bucket)
        await self.ensure_kv(self.names.registry_bucket)
        replicas = self.config.js_replicas
        await transient.retry_not_now("the artifacts store", lambda: artifacts(self.js, self.names, replicas))
        self.add_actor(
            ActorConfig(name="submit", subject=self.names.train_submit, max_concurrency=4), self.submit, TrainRequest
        )

    async def after_start(self) -> None:
        self.every(self.trainer_config.heartbeat_s, self._heartbeat, name="heartbeat")
        self.watch(self.jobs, job_keys(), self._on_job, name="jobs")
        self.every(1.0, self._tick, name="timers")

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

    async def close_resources(self) -> None:
        if self._child is not None and self._child.returncode is None:
            await self._stop_child("this node is shutting down")
        try:
            await self.nodes.delete(trainer_node_key(self.instance_id))
        except Exception:
            log.debug("could not remove the heartbeat", exc_info=True)

    # -- submit --------------------------------------------------------------------------------
    async def submit(self, req: TrainRequest, _: Call) -> TrainAccepted:
        if req.resume:
            return await self._resume(req.resume)
        req = submission.check_request(req)
        # The model first: a factory outside the trusted packages is refused before anything else.
        await asyncio.to_thread(submission.check_model, req, self.config.model_packages)
        dataset, version = parse_ref(req.dataset)
        try:
            manifest = await get_manifest(self.js, self.names, dataset, version)
        except NotFound as exc:
            raise BadRequest(f"dataset {req.dataset}: {exc.description}") from None
        req = submission.check_dataset(req, manifest)
        now = time.time()
        ids = tracing.current_ids()
        job = rendezvous.new_job(submission.job_id(req, now), req, now, rfc3339_now(), ids[0] if ids else "")
        try:
            await self.jobs.create(job_key(job.job_id), _json.encode(job))
        except KeyWrongLastSequenceError:  # the id is taken
            job = await self._resent(job)
        idle = sum(1 for n in await self._nodes() or [] if n.state == "idle")
        return TrainAccepted(job_id=job.job_id, state=job.state, nodes_available=idle)

    async def _resent(self, job: TrainJob) -> TrainJob:
        """The job stored under ``job``'s id: a resend of its submission (the first one's reply
        lost, or a 503 after its write landed) answers it, and starts nothing new."""
        if not job.request.submission_id:  # two submits of one model in the same millisecond
            raise Unavailable(f"job id {job.job_id} was taken by another submission a moment ago; resend")
        stored = _job.decode((await self.jobs.get(job_key(job.job_id))).value or b"")
        submission.check_resend(stored.request, job.request)
        return stored

    async def _resume(self, job_id: str) -> TrainAccepted:
        """A failed job forms again (restart budget renewed); its ranks resume from the checkpoint."""
        check_name(job_id, "job id")
        try:
            entry = await self.jobs.get(job_key(job_id))
        except KeyNotFoundError:
            raise BadRequest(f"no training job {job_id}") from None
        try:
            job = _job.decode(entry.value or b"")
        except msgspec.DecodeError as exc:  # ValidationError too: a state this agent does not know
            raise BadRequest(f"job {job_id}: its record cannot be read here: {exc}") from None
        if not await self._cas(job, entry.revision or 0, **rendezvous.resume(job, time.time())):
            raise BadRequest(f"job {job_id} changed while resuming it; try again")
        idle = sum(1 for n in await self._nodes() or [] if n.state == "idle")
        return TrainAccepted(job_id=job_id, state="forming", nodes_available=idle)

    # -- the control loop ----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        job = self._child_job
        node = TrainerNode(
            instance=self.instance_id,
            host=socket.gethostname(),
            address=self.address,
            pid=os.getpid(),
            state="busy" if job else "idle",
            job=job[0] if job else "",
            device=_device_name(),
        )
        try:
            await self._beats.put(trainer_node_key(self.instance_id), _json.encode(node))
        except Exception as exc:  # NATS away, a bucket electing its leader: the next beat tries again
            self._beat_outage.failed(exc)
            return
        self._beat_outage.succeeded()

    async def _on_job(self, entry: KeyValue.Entry) -> None:
        if not entry.value:
            return
        job = _job.decode(entry.value)
        self._known[job.job_id] = (job, entry.revision or 0)
        await self._act(job, entry.revision or 0)

    async def _tick(self) -> None:
        """Deadlines and lost members: what no watch event announces (every second)."""
        for job, revision in list(self._known.values()):
            try:
                await self._check_timers(job, revision)
            except Exception:
                log.warning("job %s: timer check failed", job.job_id, exc_info=True)

    async def _act(self, job: TrainJob, revision: int) -> None:
        async with self._lock:
            if rendezvous.rank_is_stale(job, self._child_job):
                await self._stop_child(f"job {job.job_id} moved to {job.state} attempt {job.attempt}")
            if job.state in rendezvous.TERMINAL:
                self._known.pop(job.job_id, None)
                return
            match rendezvous.next_step(job, self.instance_id, running=self._child is not None):
                case "join":
                    await self._join(job, revision)
                case "lead":
                    port = _free_port(self.address)
                    master = f"{self.address}:{port}"
                    await self._cas(job, revision, state="running", master=master)
                case "start":
                    await self._start_child(job, job.members.index(self.instance_id))

    async def _join(self, job: TrainJob, revision: int) -> None:
        changes = rendezvous.join(job, self.instance_id, busy=self._child_job is not None)
        if changes is not None and await self._cas(job, revision, **changes):
            rank = len(changes["members"]) - 1
            self._child_job = (job.job_id, job.attempt, rank)  # reserved: we are busy now
            log.info("joined %s attempt %d as rank %d", job.job_id, job.attempt, rank)

    async def _check_timers(self, job: TrainJob, revision: int) -> None:
        changes = rendezvous.deadline(job, time.time())
        if changes is None and job.state in ("starting", "running"):
            # Any agent may notice: a job whose only node died has no member left to say so.
            nodes = await self._nodes()
            listed = None if nodes is None else {n.instance for n in nodes}
            lost = self._absences.lost(job.members, listed, not self._beat_outage.ongoing, time.monotonic())
            changes = rendezvous.lost_members(job, set(job.members) - lost, time.time())
        if changes is not None:
            await self._apply(job, revision, changes)

    # -- children --------------------------------------------------------------------------------
    async def _start_child(self, job: TrainJob, rank: int) -> None:
        env = os.environ | {
            "AIMESH_NATS_URL": self.config.nats_url,
            "AIMESH_PREFIX": self.config.prefix,
            # The rank refuses factories outside this node's trusted packages, as submit does.
            "AIMESH_MODEL_PACKAGES": json.dumps(self.config.model_packages),
            # The address this node advertised: gloo (and NCCL) listen on its interface.
            "AIMESH_TRAINER_HOST": self.address,
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
        # Owned: cancelled at drain, when close_resources stops the rank and drops the heartbeat
        # (the other members then see this node gone and re-form the job).
        watch_child = functools.partial(self._await_child, self._child, job.job_id, job.attempt, rank)
        self.spawn(f"rank-{job.job_id}", watch_child)

    async def _await_child(self, proc: asyncio.subprocess.Process, job_id: str, attempt: int, rank: int) -> None:
        code = await proc.wait()
        async with self._lock:
            if self._child is proc:
                self._child = None
                self._child_job = None
            entry = await self.jobs.get(job_key(job_id))
            job, revision = _job.decode(entry.value or b""), entry.revision or 0
            if rendezvous.moved_on(job, attempt):
                return  # already moved on (we were stopped, or another rank reported first)
            result = await self._result(job_id, attempt)
            if rendezvous.needs_grace(code, result):
                result = await self._wait_result(job_id, attempt, RESULT_GRACE_S)
            changes = rendezvous.rank_exited(
                job, attempt=attempt, rank=rank, node=self.instance_id, code=code, result=result, now=time.time()
            )
            if changes is not None:
                await self._apply(job, revision, changes)

    async def _apply(self, job: TrainJob, revision: int, changes: rendezvous.Changes) -> bool:
        """A rendezvous decision, compare-and-set; a regroup is logged."""
        if changes.get("state") == "forming":
            log.warning("job %s attempt %d failed: %s; re-forming", job.job_id, job.attempt, changes["error"])
        return await self._cas(job, revision, **changes)

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
            await self.jobs.update(job_key(job.job_id), _json.encode(updated), last=revision)
            return True
        except KeyWrongLastSequenceError:
            return False  # someone else changed it first; the watch brings the new state

    async def _result(self, job_id: str, attempt: int) -> TrainResult | None:
        try:
            return _result.decode((await self.jobs.get(result_key(job_id, attempt))).value or b"")
        except KeyNotFoundError:
            return None

    async def _wait_result(self, job_id: str, attempt: int, within_s: float) -> TrainResult | None:
        deadline = time.monotonic() + within_s
        while (result := await self._result(job_id, attempt)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return result

    async def _nodes(self) -> list[TrainerNode] | None:
        """The live heartbeats; None when the bucket cannot be read now (not: no nodes)."""
        out: list[TrainerNode] = []
        try:
            found = await entries(self.nodes)
        except Exception as exc:  # NATS away, the bucket electing a leader: nothing known this time
            log.debug("trainer nodes not listed: %s", exc)
            return None
        for entry in found:
            try:
                out.append(_node.decode(entry.value or b""))
            except msgspec.DecodeError as exc:  # ValidationError too: another agent's version, say
                log.warning("trainer node %s: its heartbeat cannot be read: %s", entry.key, exc)
        return out

    def _nats_route_address(self) -> str:
        url = self.nc.connected_url
        if url is None or not url.hostname:
            return "127.0.0.1"
        return route_address(url.hostname, url.port or 4222)


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
