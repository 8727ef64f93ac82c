"""A NATS cluster of embedded servers (`aimesh up --cluster`, shared/cluster.py): the settings and
their checks, the server config, the replica count a cluster holds, and a real three-server
cluster on loopback with identities (routes authenticated by the shared secret) where a bucket
made with one replica is raised to three.  The multi-host proof is tests/test_multihost.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import Error as JetStreamError

from aimesh.cli import build_parser
from aimesh.supervisor import Supervisor
from shared import auth, cluster
from shared.config import MeshConfig, UpConfig, load_up_config
from shared.connect import connect
from shared.errors import ConfigError
from shared.names import Names
from tests.helpers import ROOT, free_port

NO_SERVICES = {"ingest": 0, "trainer": 0, "inference": 0, "router": 0, "metrics": 0}


def test_cluster_flags_reach_the_up_config() -> None:
    args = build_parser().parse_args(
        ["up", "--cluster", "c1", "--routes", "10.0.0.1:6222, 10.0.0.2:6222", "--cluster-port", "7222"]
    )
    assert args.routes == ["10.0.0.1:6222", "10.0.0.2:6222"]
    up = load_up_config(env={}, overrides={"cluster": args.cluster, "routes": args.routes, "cluster_port": 7222})
    assert (up.cluster, up.routes, up.cluster_port) == ("c1", ["10.0.0.1:6222", "10.0.0.2:6222"], 7222)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"routes": ["10.0.0.1:6222"]}, "needs a cluster name"),
        ({"cluster": "c1", "routes": ["10.0.0.1"]}, "must look like host:port"),
        ({"cluster": "c1", "routes": ["nats://u:p@10.0.0.1:6222"]}, "must look like host:port"),
        ({"cluster": "c1", "routes": ["10.0.0.1:70000"]}, "must look like host:port"),
        ({"cluster": "two words"}, "letters, digits"),
        ({"cluster": "c1", "server_name": "a b"}, "server_name"),
        ({"cluster": "c1", "cluster_port": 70000}, "cluster-port"),
    ],
)
def test_bad_cluster_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_up_config(env={}, overrides=overrides)


def test_cluster_settings_come_from_the_up_table(tmp_path: Path) -> None:
    path = tmp_path / "aimesh.toml"
    path.write_text('[up]\ncluster = "c1"\nroutes = ["h1:6222", "h2:6222", "h3:6222"]\nserver_name = "h1"\n')
    up = load_up_config(env={"AIMESH_CONFIG": str(path)})
    assert up.routes == ["h1:6222", "h2:6222", "h3:6222"] and up.server_name == "h1"
    path.write_text('[up]\nroutes = ["h1:6222"]\n')
    with pytest.raises(ConfigError, match="needs a cluster name"):
        load_up_config(env={"AIMESH_CONFIG": str(path)})


def test_the_cluster_block_carries_the_route_credentials() -> None:
    up = UpConfig(cluster="c1", host="10.0.0.1", routes=["10.0.0.2:6222", "[fd00::3]:6222"], server_name="h1")
    text = cluster.cluster_config(up, "s3cret-s3cret-s3cret")
    assert 'server_name: "h1"' in text and '"listen": "10.0.0.1:6222"' in text
    assert '"ping_interval": "2s"' in text and '"ping_max": 3' in text
    assert '"user": "aimesh-route"' in text and '"password": "s3cret-s3cret-s3cret"' in text
    assert "nats-route://aimesh-route:s3cret-s3cret-s3cret@10.0.0.2:6222" in text
    assert "nats-route://aimesh-route:s3cret-s3cret-s3cret@[fd00::3]:6222" in text
    open_text = cluster.cluster_config(up, None)
    assert "password" not in open_text and "nats-route://10.0.0.2:6222" in open_text


def test_the_route_secret_is_private_and_kept(tmp_path: Path) -> None:
    secret = cluster.route_secret(tmp_path)
    assert cluster.route_secret(tmp_path) == secret and len(secret) >= 16
    assert (tmp_path / cluster.ROUTE_SECRET_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / cluster.ROUTE_SECRET_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        cluster.route_secret(tmp_path)


async def test_a_single_server_keeps_one_replica_and_says_what_to_run(
    nats_url: str, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream = StreamConfig(name=names.data_stream, subjects=[f"{names.prefix}.clustertest.>"])
        await cluster.declare_stream(js, stream, 1)
        changed = StreamConfig(name=names.data_stream, subjects=[f"{names.prefix}.clustertest.>"], max_msgs=10)
        await cluster.declare_stream(js, changed, 3)  # not clustered: the rest of the update, and the hint
        info = await js.stream_info(names.data_stream)
        assert (info.config.num_replicas, info.config.max_msgs) == (1, 10)
        assert f"nats stream edit {names.data_stream} --replicas 3" in caplog.text
    finally:
        await nc.close()


def test_auth_init_writes_the_route_secret(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    out = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "init", str(creds)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "cluster.secret" in out.stdout
    assert (creds / cluster.ROUTE_SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert cluster.route_secret(creds) == (creds / cluster.ROUTE_SECRET_FILE).read_text().strip()


def test_replicas_follow_the_cluster_size() -> None:
    assert cluster.cluster_size(UpConfig()) == 1
    # This host's own route (a local address on the cluster port) is counted once.
    own = UpConfig(cluster="c", routes=["127.0.0.1:6222", "10.255.255.2:6222", "10.255.255.3:6222"])
    assert cluster.cluster_size(own) == 3
    others = UpConfig(cluster="c", routes=["10.255.255.2:6222"])
    assert cluster.cluster_size(others) == 2
    five = UpConfig(cluster="c", routes=[f"10.255.255.{i}:6222" for i in range(2, 7)])
    assert cluster.replicas_env(five, None, {}, {}) == {"AIMESH_JS_REPLICAS": "3"}
    assert cluster.replicas_env(others, None, {}, {}) == {"AIMESH_JS_REPLICAS": "2"}
    assert cluster.replicas_env(UpConfig(), None, {}, {}) == {}  # one server keeps 1
    assert cluster.replicas_env(five, None, {}, {"js_replicas": 1}) == {}  # configured wins
    assert cluster.replicas_env(five, None, {"AIMESH_JS_REPLICAS": "1"}, {}) == {}
    services_only = cluster.replicas_env(UpConfig(), "nats://a:4222,nats://b:4222,nats://c:4222", {}, {})
    assert services_only == {"AIMESH_JS_REPLICAS": "3"}


def test_the_route_address_is_the_interface_toward_nats() -> None:
    assert cluster.route_address("127.0.0.1", 4222) == "127.0.0.1"
    assert cluster.is_local_address("127.0.0.1") and not cluster.is_local_address("192.0.2.77")


async def test_a_loopback_cluster_with_identities_raises_a_one_replica_bucket(tmp_path: Path, names: Names) -> None:
    """Three embedded servers, routes authenticated with the shared secret: a bucket made with
    one replica (data from before the cluster) is raised to three at start-up."""
    credentials = tmp_path / "auth"
    auth.ensure_seeds(credentials)
    cluster_ports = [free_port() for _ in range(3)]
    routes = [f"127.0.0.1:{p}" for p in cluster_ports]
    supervisors = [
        Supervisor(
            UpConfig(
                **NO_SERVICES,
                data_dir=str(tmp_path / f"h{i}"),
                port=0,
                http_port=0,
                cluster="loop",
                cluster_port=port,
                routes=routes,
                server_name=f"h{i}",
            ),
            nats_url=None,
            child_env={"AIMESH_PREFIX": names.prefix},
            drain_timeout_s=5.0,
            credentials_dir=credentials,
        )
        for i, port in enumerate(cluster_ports)
    ]
    stop = asyncio.Event()
    runs = [asyncio.create_task(s.run(stop)) for s in supervisors]
    try:
        for s in supervisors:
            await asyncio.wait_for(s.started.wait(), 20)
        assert all(s.child_env.get("AIMESH_JS_REPLICAS") == "3" for s in supervisors)
        urls = ",".join(s.nats_url or "" for s in supervisors)
        config = MeshConfig(nats_url=urls, prefix=names.prefix, nats_nkey=str(auth.seed_path(credentials, "ingest")))
        nc = await connect(config, "test-cluster", role="ingest")
        try:
            js = nc.jetstream(timeout=10)
            bucket = names.ingest_bucket
            kv_config = KeyValueConfig(bucket=bucket, storage=StorageType.FILE, replicas=1)
            for _ in range(100):  # the JetStream meta leader is elected a few seconds after the routes
                try:
                    await js.create_key_value(kv_config)
                    break
                except (JetStreamError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.2)
            assert (await js.stream_info(f"KV_{bucket}")).config.num_replicas == 1
            assert await cluster.ensure_replicas(js, f"KV_{bucket}", 3) == 3
            info = await js.stream_info(f"KV_{bucket}")
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert info.cluster.name == "loop"
            # A host configured with fewer replicas updates a stream without shrinking it.
            stream = StreamConfig(name=names.data_stream, subjects=[f"{names.prefix}.clustertest.>"])
            await cluster.declare_stream(js, stream, 3)
            smaller = StreamConfig(name=names.data_stream, subjects=[f"{names.prefix}.clustertest.>"], max_msgs=10)
            await cluster.declare_stream(js, smaller, 1)
            info = await js.stream_info(names.data_stream)
            assert (info.config.num_replicas, info.config.max_msgs) == (3, 10)
        finally:
            await nc.close()
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
