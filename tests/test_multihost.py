"""The multi-host proof: three "hosts" as network namespaces joined by veth pairs and a bridge (a
fourth namespace) on an address range of their own, each running `aimesh up --cluster ...
--routes ...` (the CLI path), one NATS cluster with identities (routes authenticated):

- h1: router + ingest + metrics; h2 and h3: an inference worker and a trainer each.
- A dataset is ingested on h1, trained 2-rank DP across h2 and h3 (the rendezvous advertises
  each host's address, not 127.0.0.1), deployed, and served from the workers on both hosts.
- Under bounded synchronous and durable load through h1's router: h3's link goes down (the
  cluster keeps quorum on h1+h2: durable requests are accepted and answered), then up (h3's
  worker serves again); then every process of h2, its nats-server included, is SIGKILLed while
  a second 2-rank job trains across h2 and h3: no accepted durable request is lost, synchronous
  requests fail only when in flight at the kill, serving continues from h3, and the training job
  (``min_nodes=1``) re-forms on h3 alone and completes from its last checkpoint.

Figures are printed (run with -s to see them).  Namespaces, links and processes are removed
always, by the test's finally and a fixture finalizer.  Needs root and iproute2's `ip`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from aimesh.jobs import ingest, submit_training, train
from shared import auth, transient
from shared.client import request
from shared.config import MeshConfig
from shared.connect import connect
from shared.discovery import discover
from shared.names import Names, trainer_node_key
from shared.schemas import (
    Checkpoint,
    Deployment,
    DeployRequest,
    IngestRequest,
    MicroPing,
    MicroStats,
    TrainAccepted,
    TrainerNode,
    TrainJob,
    TrainRequest,
)
from tests.helpers import ROOT, TEST_STREAM_LIMITS, eventually, holds
from tests.mesh import serving
from tests.training import (
    assert_resumed_from,
    assert_trained_the_rest,
    attempt_record,
    checkpoint_of,
    first_attempt_record,
    job_record,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IP = shutil.which("ip")
BODY = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
SYNC_TIMEOUT_MS = 3000
T = TypeVar("T")
# The job that loses h2 mid-run: elastic down to one node, long enough to be training at the kill
# (about 25 steps an epoch), checkpoints small and not too often for a 3-replica object store.
ELASTIC = TrainRequest(
    model="digits-elastic",
    dataset="digits",
    factory="zoo.classifier:mlp",
    kwargs={"inputs": 64, "classes": 10, "hidden": [256, 256]},
    nodes=2,
    min_nodes=1,
    epochs=60,
    batch_size=64,
    lr=1e-3,
    checkpoint_every=50,
    # Long enough for a trainer whose jobs watch went blind in the partition to see the job (its
    # watch checks itself every 5 s: shared.kv.follow); after the kill, h3 waits this long alone.
    wait_nodes_s=15,
    collective_timeout_s=10,
)


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if IP is None:
        return "needs iproute2's `ip` for network namespaces"
    return None


class Hosts:
    """Three namespaces h1..h3 on 10.213.<net>.1-3/24, a bridge in a fourth, and the test's own
    leg into the bridge (10.213.<net>.254)."""

    def __init__(self, tmp: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.net = f"10.213.{random.randint(1, 250)}"
        self.bridge = f"amb{self.tag}"
        self.ns = {i: f"amh{self.tag}{i}" for i in (1, 2, 3)}
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []

    def addr(self, i: int) -> str:
        return f"{self.net}.{i}"

    def ip(self, *args: str, check: bool = True) -> str:
        assert IP is not None
        done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
        if check and done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def build(self) -> None:
        b = self.bridge
        self.ip("netns", "add", b)
        self.made.append(b)
        self.ip("-n", b, "link", "add", "br0", "type", "bridge")
        self.ip("-n", b, "link", "set", "br0", "up")
        for i, ns in self.ns.items():
            self.ip("netns", "add", ns)
            self.made.append(ns)
            port, eth = f"a{self.tag}{i}", f"e{self.tag}{i}"
            self.ip("link", "add", port, "type", "veth", "peer", "name", eth)
            self.ip("link", "set", port, "netns", b)
            self.ip("link", "set", eth, "netns", ns)
            self.ip("-n", ns, "link", "set", eth, "name", "eth0")
            self.ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")
            self.ip("-n", ns, "link", "set", "lo", "up")
            self.ip("-n", b, "link", "set", port, "master", "br0")
            self.ip("-n", b, "link", "set", port, "up")
        # The test's leg: its NATS client and HTTP load reach h1 from the root namespace.
        mine, theirs = f"r{self.tag}", f"q{self.tag}"
        self.ip("link", "add", mine, "type", "veth", "peer", "name", theirs)
        self.made.append(f"link:{mine}")
        self.ip("link", "set", theirs, "netns", b)
        self.ip("-n", b, "link", "set", theirs, "master", "br0")
        self.ip("-n", b, "link", "set", theirs, "up")
        self.ip("addr", "add", f"{self.addr(254)}/24", "dev", mine)
        self.ip("link", "set", mine, "up")

    def link(self, i: int, up: bool) -> None:
        self.ip("-n", self.bridge, "link", "set", f"a{self.tag}{i}", "up" if up else "down")

    def pids(self, i: int) -> list[int]:
        return [int(p) for p in self.ip("netns", "pids", self.ns[i], check=False).split()]

    def kill_host(self, i: int) -> int:
        """SIGKILL every process in host ``i``'s namespace; returns how many."""
        pids = self.pids(i)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def start(self, i: int, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert IP is not None
        log = open(self.tmp / f"h{i}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [IP, "netns", "exec", self.ns[i], *args],
            env=env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        """Processes, namespaces (their veths and the bridge go with them), the test's leg."""
        for i in self.ns:
            self.kill_host(i)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for name in reversed(self.made):
            if name.startswith("link:"):
                self.ip("link", "del", name[5:], check=False)
            else:
                self.ip("netns", "del", name, check=False)
        self.made.clear()

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for i in self.ns:
            path = self.tmp / f"h{i}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- h{i} ---\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    made = Hosts(tmp_path)
    try:
        made.build()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        made.cleanup()
        pytest.skip(f"cannot build network namespaces here: {exc}")
    yield made
    made.cleanup()


@dataclass
class Load:
    base: str
    sync: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, status)
    accepted: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    refused: list[tuple[float, int]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    n: int = 0

    async def sync_client(self, http: aiohttp.ClientSession) -> None:
        headers = {"Aimesh-Timeout-Ms": str(SYNC_TIMEOUT_MS)}
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                async with http.post(f"{self.base}/v2/models/digits/infer", json=BODY, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            self.sync.append((start, time.monotonic(), status))
            await asyncio.sleep(0.02)

    async def durable_client(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            self.n += 1
            rid = f"mh{self.n}"
            try:
                async with http.post(f"{self.base}/v2/models/digits/infer?async=1", json={**BODY, "id": rid}) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            if status == 202:
                self.accepted.append(rid)
                self.accepted_at.append(time.monotonic())
            else:
                self.refused.append((time.monotonic(), status))
            await asyncio.sleep(0.05)

    def durable_flowing(self) -> bool:
        """Durable requests accepted in the last second, and none refused."""
        now = time.monotonic()
        return any(a > now - 1 for a in self.accepted_at[-30:]) and not any(t > now - 1 for t, _ in self.refused[-30:])

    def refused_until(self, t: float) -> float:
        """Seconds from ``t`` to the last durable request refused after it (0: none)."""
        return max((r - t for r, _ in self.refused if r >= t), default=0.0)

    async def unanswered(self, http: aiohttp.ClientSession) -> list[str]:
        missing = []
        for rid in self.accepted:
            async with http.get(f"{self.base}/v2/results/{rid}") as resp:
                if resp.status != 200:
                    missing.append(rid)
        return missing


async def worker_counts(nc: NatsClient, names: Names, hosts: Hosts) -> dict[int, int]:
    """Synchronous requests each host's inference worker has served (from the workers' STATS)."""
    where = {pid: i for i in hosts.ns for pid in hosts.pids(i)}
    counts: dict[int, int] = {}
    for stats in await discover(nc, "STATS", MicroStats, name=names.micro_name("inference"), wait_s=1.0):
        host = where.get(int(stats.metadata.get("pid", "0")))
        if host is not None:
            counts[host] = sum(e.num_requests for e in stats.endpoints if e.name.startswith("infer"))
    return counts


async def ready(nc: NatsClient, names: Names, service: str, count: int) -> bool:
    pings = await discover(nc, "PING", MicroPing, name=names.micro_name(service), wait_s=0.5)
    return sum(1 for p in pings if p.metadata.get("state") == "ready") >= count


def start_mesh(hosts: Hosts, prefix: str, credentials: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "OTEL_", "NATS_"))}
    env |= TEST_STREAM_LIMITS | {
        "PYTHONPATH": str(ROOT),
        "OTEL_SDK_DISABLED": "true",
        "AIMESH_ROUTER_HOST": hosts.addr(1),
        "AIMESH_ROUTER_PORT": "8080",
        "AIMESH_ROUTER_INSECURE": "true",
        "AIMESH_INFERENCE_DURABLE_ACK_WAIT_S": "2",
        "AIMESH_TRAINER_THREADS": "1",
    }
    routes = ",".join(f"{hosts.addr(i)}:6222" for i in hosts.ns)
    roles = {1: ("--router", "1", "--ingest", "1", "--metrics", "1", "--inference", "0", "--trainer", "0")}
    for i in hosts.ns:
        counts = roles.get(
            i, ("--router", "0", "--ingest", "0", "--metrics", "0", "--inference", "1", "--trainer", "1")
        )
        args = [
            sys.executable, "-m", "aimesh", "up", "--prefix", prefix,
            "--data-dir", str(hosts.tmp / f"data-h{i}"), "--host", hosts.addr(i), "--port", "4222",
            "--http-port", "8222", "--cluster", "multihost", "--cluster-port", "6222", "--routes", routes,
            "--server-name", f"h{i}", "--credentials", str(credentials), "--insecure", *counts,
        ]  # fmt: skip
        hosts.start(i, args, env)


async def test_three_hosts_serve_train_survive_a_partition_and_a_killed_host(hosts: Hosts) -> None:
    names = Names(f"mh{hosts.tag}")
    credentials = hosts.tmp / "auth"  # one folder for every host: seeds and the routes' secret
    made = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "init", str(credentials), "--prefix", names.prefix],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    figures: dict[str, object] = {}
    try:
        start_mesh(hosts, names.prefix, credentials)
        operator = MeshConfig(
            nats_url=f"nats://{hosts.addr(1)}:4222",
            prefix=names.prefix,
            nats_nkey=str(auth.seed_path(credentials, "operator")),
        )
        nc = await asyncio.wait_for(connect(operator, "multihost-test", role="operator"), 60)
        try:
            await run_scenario(hosts, names, nc, figures)
        finally:
            await nc.close()
    except BaseException:
        print(hosts.log_tail())
        raise
    finally:
        print("multihost figures:", msgspec.json.encode(figures).decode())
        hosts.cleanup()


async def run_scenario(hosts: Hosts, names: Names, nc: NatsClient, figures: dict[str, object]) -> None:
    t0 = time.monotonic()
    for service, count in (("router", 1), ("ingest", 1), ("trainer", 2), ("inference", 2)):
        await eventually(lambda s=service, c=count: ready(nc, names, s, c), 240, f"{count} {service} ready")
    figures["mesh_ready_s"] = round(time.monotonic() - t0, 1)
    js = nc.jetstream(timeout=10)
    info = await js.stream_info(names.requests_stream)
    assert info.config.num_replicas == 3 and info.cluster is not None, info.cluster
    figures["requests_stream"] = {"replicas": info.config.num_replicas, "leader": info.cluster.leader}

    # Ingest on h1, train 2-rank DP across h2 and h3, deploy, serve from both.
    t1 = time.monotonic()
    _, manifest = await ingest(
        nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=2), progress=False
    )
    assert manifest is not None
    job = await train(
        nc,
        names,
        TrainRequest(
            model="digits",
            dataset="digits",
            factory="zoo.classifier:mlp",
            kwargs={"inputs": 64, "classes": 10},
            nodes=2,
            epochs=2,
            batch_size=64,
            lr=3e-3,
        ),
        show=False,
    )
    assert job.state == "complete", job.error
    master_host = job.master.rsplit(":", 1)[0]
    assert master_host in (hosts.addr(2), hosts.addr(3)), f"rank 0 advertised {job.master}"
    figures["train"] = {"world": job.world, "master": job.master, "s": round(time.monotonic() - t1, 1)}
    await request(nc, names.deploy, DeployRequest(model="digits"), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 120, "both workers to serve digits@1")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        load = Load(f"http://{hosts.addr(1)}:8080")
        clients = [asyncio.create_task(load.sync_client(http)) for _ in range(4)]
        clients.append(asyncio.create_task(load.durable_client(http)))
        try:
            elastic = await _phases(hosts, names, nc, http, load, figures)
        finally:
            load.stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
        t_end = time.monotonic()
        figures["durable"] = {"accepted": len(load.accepted), "refused": len(load.refused)}
        await eventually(lambda: _all_answered(load, http), 90, "every accepted durable request to be answered")
        figures["durable"] = {
            **figures["durable"],
            "lost": 0,
            "all_answered_after_load_s": round(time.monotonic() - t_end, 1),
        }  # type: ignore[dict-item]
    await _follow_elastic_job(nc, names, elastic, figures)


async def _all_answered(load: Load, http: aiohttp.ClientSession) -> bool:
    missing = await load.unanswered(http)
    if missing and int(time.monotonic()) % 5 == 0:
        print(f"{len(missing)} accepted durable requests not answered yet, e.g. {missing[:3]}")
    return not missing


async def _phases(
    hosts: Hosts, names: Names, nc: NatsClient, http: aiohttp.ClientSession, load: Load, figures: dict[str, object]
) -> ElasticJob:
    # Steady: both hosts' workers serve through the queue group.
    both = await eventually(
        lambda: _counts_if(nc, names, hosts, lambda c: c.get(2, 0) > 0 and c.get(3, 0) > 0),
        30,
        "the workers on h2 and h3 both to serve",
    )
    figures["steady_counts"] = both
    steady_failed = sum(1 for _, _, s in load.sync if s != 200)

    # Partition: h3's link down.  h1+h2 keep quorum: durable requests are accepted, and answered.
    accepted_before = len(load.accepted)
    hosts.link(3, up=False)
    t_cut = time.monotonic()
    # Streams led from h3 elect a leader on h1 or h2 once the others miss its heartbeats.
    # h1 closes its routes to h3 once they miss their pings (shared.cluster.ROUTE_PING_*).
    await eventually(lambda: _routes_to(http, hosts, 3, want=False), 30, "h1 to drop its routes to h3")
    route_closed_s = time.monotonic() - t_cut
    await asyncio.sleep(max(0.0, 5 - route_closed_s))  # at least 5 s cut off
    await eventually(
        lambda: holds(load.durable_flowing()), 45, "durable requests to be accepted on h1+h2 while h3 is cut off"
    )
    hosts.link(3, up=True)
    t_heal = time.monotonic()
    await eventually(lambda: _routes_to(http, hosts, 3, want=True), 30, "h1's routes to h3 to come back")
    route_back_s = time.monotonic() - t_heal
    before = await worker_counts(nc, names, hosts)
    await eventually(
        lambda: _counts_if(nc, names, hosts, lambda c: c.get(3, 0) > before.get(3, 0)),
        60,
        "h3's worker to serve again after healing",
    )
    failed_in_cut = [(st, s) for st, _, s in load.sync if s != 200 and st >= t_cut - SYNC_TIMEOUT_MS / 1000]
    figures["partition"] = {
        "route_closed_after_cut_s": round(route_closed_s, 1),
        "route_back_after_heal_s": round(route_back_s, 1),
        "durable_accepted_during": len(load.accepted) - accepted_before,
        "durable_refused_until_s_after_cut": round(load.refused_until(t_cut), 2),
        "durable_refused_during": _statuses([s for t, s in load.refused if t_cut <= t <= t_heal]),
        "cut_s": round(t_heal - t_cut, 1),
        "h3_recovered_after_heal_s": round(time.monotonic() - t_heal, 1),
        "sync_failed_during": _statuses([s for _, s in failed_in_cut]),
        "sync_failed_sent_at_s_after_cut": [round(st - t_cut, 2) for st, _ in failed_in_cut],
    }

    # Kill every process of h2, its nats-server included, under load and while a job trains on h2+h3.
    elastic = await _start_elastic_job(nc, names, hosts)
    before = await worker_counts(nc, names, hosts)
    t_kill = time.monotonic()
    killed = hosts.kill_host(2)
    elastic.killed_at = t_kill
    await eventually(
        lambda: _counts_if(nc, names, hosts, lambda c: c.get(3, 0) > before.get(3, 0) + 5 and 2 not in c),
        60,
        "serving to continue from h3 alone",
    )
    t_recovered = time.monotonic()
    # The streams whose leader was on h2 elect one on h1 or h3 (raft: seconds); until then the
    # router cannot queue durable requests (refused, never accepted and lost).
    await asyncio.sleep(1.5)
    await eventually(lambda: holds(load.durable_flowing()), 45, "durable requests to be accepted again after the kill")
    after_kill = [(st, s) for st, _, s in load.sync if st >= t_kill - SYNC_TIMEOUT_MS / 1000]
    failed = [st - t_kill for st, s in after_kill if s != 200]
    figures["kill_h2"] = {
        "processes": killed,
        "recovered_s": round(t_recovered - t_kill, 2),
        "sync_after_kill": len(after_kill),
        "sync_failed": len(failed),
        "failed_started_at_s": [round(f, 2) for f in failed],
        "durable_refused_after_kill": _statuses([s for t, s in load.refused if t >= t_kill]),
        "durable_refused_until_s_after_kill": round(load.refused_until(t_kill), 2),
    }
    # Refused only as "not now, resend with the same id" (while streams elect leaders).
    assert all(status == 503 for _, status in load.refused), _statuses([s for _, s in load.refused])
    figures["sync_total"] = len(load.sync)
    assert steady_failed == 0, f"{steady_failed} synchronous requests failed before any fault"
    # A synchronous request fails only when it was in flight on h2 at the kill (sent before it).
    assert all(f <= 0.5 for f in failed), f"requests sent after the kill failed: {failed}"
    assert len(failed) <= 4, f"{len(failed)} failed: more than the 4 clients had in flight"
    return elastic


@dataclass
class ElasticJob:
    """The job running across h2 and h3 when h2 is killed."""

    job_id: str
    members: dict[str, int]  # trainer instance → host
    checkpoint: Checkpoint
    killed_at: float = 0.0


async def _start_elastic_job(nc: NatsClient, names: Names, hosts: Hosts) -> ElasticJob:
    """Submit ``ELASTIC`` and return once it runs across h2 and h3 and has stored a checkpoint."""
    accepted = await _submit(nc, names, ELASTIC)
    kv = await _bucket(nc, names.jobs_bucket)

    async def running() -> TrainJob | None:
        job = await _read_job(kv, accepted.job_id)
        if job is None:
            return None
        assert job.state in ("forming", "starting", "running"), (job.state, job.error)
        return job if job.state == "running" and job.world == 2 else None

    job = await eventually(running, 120, "the elastic job to run on two nodes")
    checkpoint = lambda: _unless_not_now(checkpoint_of(kv, accepted.job_id))  # noqa: E731
    seen = await eventually(checkpoint, 120, "the elastic job's first checkpoint")
    nodes = await _bucket(nc, names.trainers_bucket)
    members: dict[str, int] = {}
    for member in job.members:
        node = msgspec.json.decode((await nodes.get(trainer_node_key(member))).value or b"", type=TrainerNode)
        members[member] = next(i for i in hosts.ns if hosts.addr(i) == node.address)
    assert sorted(members.values()) == [2, 3], members
    still = await eventually(lambda: _read_job(kv, accepted.job_id), 30, "the elastic job's record")
    assert (still.state, still.attempt) == ("running", 1), "the job ended before the kill: raise ELASTIC.epochs"
    return ElasticJob(accepted.job_id, members, seen)


async def _bucket(nc: NatsClient, bucket: str) -> KeyValue:
    """The bucket, waiting out JetStream's "not now" (this test's client meets elections too)."""
    return await transient.retry_not_now(bucket, lambda: nc.jetstream(timeout=10).key_value(bucket), pause_s=0.5)


async def _read_job(kv: KeyValue, job_id: str) -> TrainJob | None:
    return await _unless_not_now(job_record(kv, job_id))


async def _unless_not_now(read: Awaitable[T]) -> T | None:
    """What ``read`` returns; None while JetStream cannot answer (a stream electing its leader)."""
    try:
        return await read
    except Exception as exc:
        if transient.jetstream_not_now(exc):
            return None
        raise


async def _submit(nc: NatsClient, names: Names, req: TrainRequest) -> TrainAccepted:
    """Submit as the CLI does: resent while the trainer answers 503 (a server that rejoined after
    the partition is still catching up its streams), with one submission id, so a first try that
    was stored after all is not a second job."""
    return await submit_training(nc, names, req)


async def _follow_elastic_job(nc: NatsClient, names: Names, elastic: ElasticJob, figures: dict[str, object]) -> None:
    """The job that lost h2 re-formed on h3 alone (min_nodes=1), resumed from its checkpoint, and
    trained what was left."""
    kv = await _bucket(nc, names.jobs_bucket)

    async def ended() -> TrainJob | None:
        job = await _read_job(kv, elastic.job_id)
        return job if job is not None and job.state in ("complete", "failed") else None

    final = await eventually(ended, 240, "the elastic job to end")
    figures["elastic_job"] = {
        "state": final.state,
        "attempts": final.attempt,
        "world": final.world,
        "ended_after_kill_s": round(time.monotonic() - elastic.killed_at, 1),
        "checkpoint_seen": [elastic.checkpoint.epoch, elastic.checkpoint.step],
        "error": final.error,
    }
    assert final.state == "complete", final.error
    h3 = next(m for m, i in elastic.members.items() if i == 3)
    assert final.world == 1 and final.members == [h3] and final.restarts >= 1, final
    resumed = await first_attempt_record(kv, elastic.job_id, range(2, final.attempt + 1))
    assert resumed.world == 1 and resumed.checkpoint_world == 2, resumed
    assert_resumed_from(resumed, elastic.checkpoint)
    assert_trained_the_rest(await attempt_record(kv, elastic.job_id, final.attempt), ELASTIC.epochs)
    assert final.metrics["eval_accuracy"] >= 0.9, final.metrics


async def _routes_to(http: aiohttp.ClientSession, hosts: Hosts, i: int, *, want: bool) -> bool:
    """Whether h1's server has (``want``) or lacks a route to host ``i`` (its monitoring /routez)."""
    async with http.get(f"http://{hosts.addr(1)}:8222/routez") as resp:
        routes = (await resp.json()).get("routes") or []
    present = any(r.get("ip") == hosts.addr(i) or r.get("remote_name") == f"h{i}" for r in routes)
    return present == want


def _statuses(statuses: list[int]) -> dict[str, int]:
    """How many of each HTTP status (0: no answer)."""
    out: dict[str, int] = {}
    for status in statuses:
        out[str(status)] = out.get(str(status), 0) + 1
    return out


async def _counts_if(
    nc: NatsClient, names: Names, hosts: Hosts, ok: Callable[[dict[int, int]], bool]
) -> dict[int, int] | None:
    counts = await worker_counts(nc, names, hosts)
    return counts if ok(counts) else None
