"""Identities on the bus: each role, connected with its own nkey, can do what it needs and the
server refuses the rest.  A real nats-server started with the config `aimesh auth init` writes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig

from shared import auth
from shared.config import MeshConfig
from shared.connect import connect_options, connect_single
from shared.errors import ConfigError
from shared.names import Names
from shared.natsserver import NatsServer
from tests.helpers import ROOT

PREFIX = "authmesh"
NAMES = Names(PREFIX)


@dataclass
class Authed:
    url: str
    creds: Path


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Authed]:
    """A server admitting only the identities `aimesh auth init` wrote (through the CLI)."""
    root = tmp_path_factory.mktemp("auth")
    creds = root / "creds"
    out = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "init", str(creds), "--prefix", PREFIX],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    server = NatsServer(store_dir=root / "store", http_port=None, extra_args=["-c", str(creds / "nats-server.conf")])
    server.start()
    try:
        yield Authed(server.url, creds)
    finally:
        server.stop()


@dataclass
class RoleClient:
    nc: NatsClient
    violations: list[str] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)


async def as_role(authed: Authed, role: str) -> RoleClient:
    client = RoleClient(nc=NatsClient())

    async def on_error(exc: Exception) -> None:
        client.violations.append(str(exc).lower())
        client.seen.set()

    config = MeshConfig(nats_url=authed.url, prefix=PREFIX, nats_nkey=str(auth.seed_path(authed.creds, role)))
    options = connect_options(config, f"test-{role}", role) | {"error_cb": on_error, "allow_reconnect": False}
    await client.nc.connect(**options)
    return client


@pytest.fixture
async def clients(authed: Authed) -> AsyncIterator[dict[str, RoleClient]]:
    made = {role: await as_role(authed, role) for role in auth.ROLES}
    # The operator declares what the matrix touches (services would, each its own).
    js = made["operator"].nc.jetstream()
    for bucket in (NAMES.experiments_bucket, NAMES.registry_bucket, NAMES.deployments_bucket):
        await js.create_key_value(bucket=bucket)
    await js.add_stream(StreamConfig(name=NAMES.data_stream, subjects=[NAMES.data_stream_subjects]))
    await js.add_stream(StreamConfig(name=NAMES.requests_stream, subjects=[NAMES.durable_subjects]))
    yield made
    for client in made.values():
        await client.nc.close()


async def outcome(client: RoleClient, action: Callable[[], Awaitable[Any]], what: str) -> str:
    """'ok' when ``action`` completes, 'refused' when the server reports a permissions violation
    naming ``what``; anything else fails the test."""
    client.violations.clear()
    client.seen.clear()
    task = asyncio.ensure_future(action())
    seen = asyncio.ensure_future(client.seen.wait())
    done, _ = await asyncio.wait({task, seen}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    try:
        if seen in done or client.seen.is_set():
            assert any("permissions violation" in v and what.lower() in v for v in client.violations), client.violations
            return "refused"
        if task in done:
            task.result()
            # A refused publish is reported after the write.  The server answers a PING after it
            # has refused what came before it, and nats-py runs the error callback for an -ERR
            # before it resolves a later PONG: once the flush returns, a refusal has been seen.
            await client.nc.flush()
            return "refused" if client.seen.is_set() else "ok"
        raise AssertionError(f"{what}: neither done nor refused within 5 s")
    finally:
        task.cancel()
        seen.cancel()
        await asyncio.gather(task, seen, return_exceptions=True)


def publish(client: RoleClient, subject: str) -> Callable[[], Awaitable[Any]]:
    async def go() -> None:
        await client.nc.publish(subject, b"{}")
        await client.nc.flush()

    return go


def subscribe(client: RoleClient, subject: str) -> Callable[[], Awaitable[Any]]:
    async def go() -> None:
        await client.nc.subscribe(subject)
        await client.nc.flush()

    return go


def kv_put(client: RoleClient, bucket: str, key: str) -> Callable[[], Awaitable[Any]]:
    async def go() -> None:
        kv = await client.nc.jetstream().key_value(bucket)
        await kv.put(key, b"x")

    return go


def stream_info(client: RoleClient, stream: str) -> Callable[[], Awaitable[Any]]:
    return lambda: client.nc.jetstream().stream_info(stream)


def consumer_create(client: RoleClient, stream: str) -> Callable[[], Awaitable[Any]]:
    async def go() -> None:
        sub = await client.nc.jetstream().pull_subscribe(N.durable_subjects, stream=stream)
        await sub.unsubscribe()

    return go


def stream_delete(client: RoleClient, stream: str) -> Callable[[], Awaitable[Any]]:
    return lambda: client.nc.jetstream().delete_stream(stream)


N = NAMES
SPLIT_KEY = "split.digits"
# (role, operation, its argument, expected): the rows plus a sample of each role's needs.
MATRIX: list[tuple[str, str, str, str]] = [
    # scale decisions: only the metrics identity publishes them, only the supervisor follows them
    ("metrics", "publish", N.scale("inference"), "ok"),
    ("router", "publish", N.scale("inference"), "refused"),
    ("operator", "publish", N.scale("inference"), "ok"),  # the operator may do what the CLI does
    ("ingest", "publish", N.scale("inference"), "refused"),
    ("supervisor", "subscribe", N.scale_subjects, "ok"),
    ("supervisor", "publish", N.scale("inference"), "refused"),
    # splits: the operator sets them, the metrics service rewrites them with its verdicts
    ("operator", "kv_put", f"{N.experiments_bucket}/{SPLIT_KEY}", "ok"),
    ("metrics", "kv_put", f"{N.experiments_bucket}/{SPLIT_KEY}", "ok"),
    ("router", "kv_put", f"{N.experiments_bucket}/{SPLIT_KEY}", "refused"),
    ("inference", "kv_put", f"{N.experiments_bucket}/{SPLIT_KEY}", "refused"),
    ("metrics", "kv_put", f"{N.deployments_bucket}/deploy.digits.1", "refused"),
    # the registry: trainers write it, workers and the router only read it
    ("trainer", "kv_put", f"{N.registry_bucket}/digits.1", "ok"),
    ("inference", "kv_put", f"{N.registry_bucket}/digits.1", "refused"),
    ("router", "kv_put", f"{N.registry_bucket}/digits.1", "refused"),
    ("inference", "kv_put", f"{N.deployments_bucket}/deploy.digits.1", "ok"),
    ("router", "stream_info", f"KV_{N.registry_bucket}", "ok"),
    # inference inputs: only the router and the workers see them (metrics reads the queue's depth)
    ("metrics", "stream_info", N.requests_stream, "ok"),
    ("metrics", "consumer_create", N.requests_stream, "refused"),
    ("inference", "consumer_create", N.requests_stream, "ok"),
    ("router", "subscribe", N.infer_routed_subjects, "ok"),
    ("inference", "subscribe", N.infer("*", "*"), "ok"),
    ("ingest", "subscribe", f"{PREFIX}.infer.>", "refused"),
    ("metrics", "subscribe", f"{PREFIX}.infer.>", "refused"),
    ("trainer", "subscribe", f"{PREFIX}.infer.>", "refused"),
    ("router", "publish", N.infer("digits", "1"), "ok"),
    # one worker's own subject (a hedge, or a first attempt sent past a suspect worker): the
    # router sends, workers listen; nobody else may do either
    ("router", "publish", N.infer_direct("digits", "1", "worker1"), "ok"),
    ("inference", "subscribe", N.infer_direct_subjects, "ok"),
    ("router", "subscribe", N.infer_direct_subjects, "refused"),
    ("inference", "publish", N.infer_direct("digits", "1", "worker1"), "refused"),
    ("metrics", "publish", N.infer_direct("digits", "1", "worker1"), "refused"),
    ("ingest", "publish", N.infer_direct("digits", "1", "worker1"), "refused"),
    ("trainer", "publish", N.infer_direct("digits", "1", "worker1"), "refused"),
    ("supervisor", "subscribe", N.infer_direct_subjects, "refused"),
    # cancelling a generation: the router asks, every worker listens; nobody else does either
    ("router", "publish", N.generate_cancel("abc"), "ok"),
    ("inference", "subscribe", N.generate_cancel_subjects, "ok"),
    ("metrics", "publish", N.generate_cancel("abc"), "refused"),
    ("trainer", "subscribe", N.generate_cancel_subjects, "refused"),
    ("router", "subscribe", N.generate_cancel_subjects, "refused"),
    ("trainer", "publish", N.infer("digits", "1"), "refused"),
    # training data: the router cannot read it; trainers can
    ("router", "stream_info", N.data_stream, "refused"),
    ("trainer", "stream_info", N.data_stream, "ok"),
    ("ingest", "publish", N.data_subject("d", "1", 0), "ok"),
    ("router", "publish", N.data_subject("d", "1", 0), "refused"),
    # nobody reads another identity's replies; each its own inbox
    ("router", "subscribe", "_INBOX.>", "refused"),
    ("metrics", "subscribe", f"_INBOX.{PREFIX}.router.>", "refused"),
    ("metrics", "subscribe", f"{auth.inbox_prefix(N, 'metrics')}.x", "ok"),
    # training and ingest jobs: only the operator submits
    ("operator", "publish", N.train_submit, "ok"),
    ("router", "publish", N.train_submit, "refused"),
    ("inference", "publish", N.ingest_submit, "refused"),
    ("router", "publish", N.deploy, "refused"),
    # streams are deleted by the operator only
    ("metrics", "stream_delete", N.data_stream, "refused"),
    ("ingest", "stream_delete", N.data_stream, "refused"),
    ("trainer", "stream_delete", f"KV_{N.registry_bucket}", "refused"),
]
OPERATIONS = {
    "publish": publish,
    "subscribe": subscribe,
    "stream_info": stream_info,
    "stream_delete": stream_delete,
    "consumer_create": consumer_create,
    "kv_put": lambda c, arg: kv_put(c, *arg.split("/", 1)),
}


async def test_each_role_may_do_what_it_needs_and_nothing_else(clients: dict[str, RoleClient]) -> None:
    results = []
    for role, op, arg, expected in MATRIX:
        # What the server's refusal names: the subject, or the bucket (opening it may be refused first).
        what = {
            "kv_put": arg.split("/", 1)[0],
            "stream_info": f"$JS.API.STREAM.INFO.{arg}",
            "stream_delete": f"$JS.API.STREAM.DELETE.{arg}",
            "consumer_create": f"$JS.API.CONSUMER.CREATE.{arg}",
        }.get(op, arg)
        got = await outcome(clients[role], OPERATIONS[op](clients[role], arg), what)
        results.append((role, op, arg, expected, got))
    wrong = [r for r in results if r[3] != r[4]]
    assert not wrong, "\n".join(f"{role} {op} {arg}: expected {exp}, got {got}" for role, op, arg, exp, got in wrong)


async def test_the_operator_deletes_a_stream(clients: dict[str, RoleClient]) -> None:
    assert await outcome(clients["operator"], stream_delete(clients["operator"], N.data_stream), "DELETE") == "ok"


async def test_a_client_without_credentials_is_refused(authed: Authed) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect_single({"servers": [authed.url], "allow_reconnect": False, "connect_timeout": 2})


async def test_a_wrong_key_is_refused_at_once(authed: Authed, tmp_path: Path) -> None:
    """A seed the server does not know: refused, and connect() does not retry it forever."""
    from shared.connect import connect

    stranger = tmp_path / "stranger.nk"
    auth.write_private(stranger, auth.new_seed())
    config = MeshConfig(nats_url=authed.url, prefix=PREFIX, nats_nkey=str(stranger))
    with pytest.raises(ConfigError, match="refused this identity"):
        await asyncio.wait_for(connect(config, "stranger", role="router"), 10)


def test_seed_files_are_private_and_checked(tmp_path: Path) -> None:
    keys = auth.ensure_seeds(tmp_path / "creds")
    assert set(keys) == set(auth.ROLES)
    assert (tmp_path / "creds").stat().st_mode & 0o777 == 0o700
    for role in auth.ROLES:
        path = auth.seed_path(tmp_path / "creds", role)
        assert path.stat().st_mode & 0o777 == 0o600
        assert keys[role].startswith("U")
    again = auth.ensure_seeds(tmp_path / "creds")
    assert again == keys  # kept, not regenerated
    rotated = auth.ensure_seeds(tmp_path / "creds", rotate=["router"])
    assert rotated["router"] != keys["router"] and rotated["ingest"] == keys["ingest"]
    loose = auth.seed_path(tmp_path / "creds", "router")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        auth.read_seed(loose)
    (tmp_path / "junk.nk").write_text("not a seed")
    (tmp_path / "junk.nk").chmod(0o600)
    with pytest.raises(ConfigError, match="not a NATS user nkey seed"):
        auth.read_seed(tmp_path / "junk.nk")


def test_permissions_are_printed_for_every_role() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "permissions", "--json", "--prefix", PREFIX],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    grants = json.loads(out.stdout)
    assert set(grants) == set(auth.ROLES)
    assert N.scale_subjects in grants["metrics"]["publish"]["allow"]
    assert not any("scale" in s for s in grants["router"]["publish"]["allow"])
    assert "allow_responses" not in grants["operator"]
    bad = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "permissions", "--role", "root"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown role 'root'" in bad.stderr
