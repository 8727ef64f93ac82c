"""A NATS cluster of embedded servers (`aimesh up --cluster`, shared/cluster.py): the settings and
their checks, the server config, the replica count a cluster holds, and a real three-server
cluster on loopback with identities (routes authenticated by the shared secret) where a bucket
made with one replica is raised to three; routes over mutual TLS with the cluster CA `aimesh auth
init` makes (three servers through `aimesh up`, and a server whose certificate another CA signed,
refused).  The multi-host proof is tests/test_multihost.py."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import nats
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import Error as JetStreamError

from aimesh.cli import build_parser
from aimesh.supervisor import Supervisor
from shared import auth, cluster
from shared.config import MeshConfig, UpConfig, load_up_config
from shared.connect import connect
from shared.errors import ConfigError
from shared.names import Names
from shared.tls import certificate_names, client_context, issue_certificate, make_ca
from tests.helpers import AIMESH, ROOT, clean_env, eventually, free_port

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


def loopback_cluster(
    tmp_path: Path, names: Names, name: str, credentials: Path, extra: dict[int, dict[str, str]] | None = None
) -> list[Supervisor]:
    """Three embedded servers of cluster ``name`` on loopback, no services; ``extra``: more
    ``[up]`` settings for server i."""
    cluster_ports = [free_port() for _ in range(3)]
    routes = [f"127.0.0.1:{p}" for p in cluster_ports]
    return [
        Supervisor(
            UpConfig(
                **NO_SERVICES,
                data_dir=str(tmp_path / f"h{i}"),
                port=0,
                http_port=0,
                cluster=name,
                cluster_port=port,
                routes=routes,
                server_name=f"h{i}",
                **(extra or {}).get(i, {}),
            ),
            nats_url=None,
            child_env={"AIMESH_PREFIX": names.prefix},
            drain_timeout_s=5.0,
            credentials_dir=credentials,
        )
        for i, port in enumerate(cluster_ports)
    ]


async def test_a_loopback_cluster_with_identities_raises_a_one_replica_bucket(tmp_path: Path, names: Names) -> None:
    """Three embedded servers, routes authenticated with the shared secret: a bucket made with
    one replica (data from before the cluster) is raised to three at start-up."""
    credentials = tmp_path / "auth"
    auth.ensure_seeds(credentials)
    supervisors = loopback_cluster(tmp_path, names, "loop", credentials)
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


# -- encrypted routes -------------------------------------------------------------------------


def _auth_init(creds: Path) -> str:
    out = subprocess.run([*AIMESH, "auth", "init", str(creds)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_auth_init_adds_the_cluster_ca_and_keeps_what_is_there(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    assert "cluster-ca.pem" in _auth_init(creds)
    ca, ca_key = creds / cluster.CLUSTER_CA_FILE, creds / cluster.CLUSTER_CA_KEY_FILE
    assert ca_key.stat().st_mode & 0o777 == 0o600
    assert (
        x509.load_pem_x509_certificate(ca.read_bytes())
        .extensions.get_extension_for_class(x509.BasicConstraints)
        .value.ca
    )
    # A folder from before the CA: run again, the seeds and the secret are kept, the CA added.
    ca.unlink()
    ca_key.unlink()
    kept = {p.name: p.read_bytes() for p in creds.iterdir() if p.suffix in (".nk", ".secret")}
    _auth_init(creds)
    assert {p.name: p.read_bytes() for p in creds.iterdir() if p.suffix in (".nk", ".secret")} == kept
    first = ca.read_bytes()
    _auth_init(creds)
    assert ca.read_bytes() == first  # an existing CA is kept: every host's certificate hangs on it
    ca_key.unlink()
    with pytest.raises(ConfigError, match=r"without .*cluster-ca\.key"):
        cluster.ensure_cluster_ca(creds)


def test_the_cluster_block_carries_the_route_tls() -> None:
    up = UpConfig(cluster="c1", host="10.0.0.1", routes=["10.0.0.2:6222"], server_name="h1")
    files = cluster.RouteTls(cert=Path("/d/route.pem"), key=Path("/d/route.key"), ca=Path("/c/cluster-ca.pem"))
    text = cluster.cluster_config(up, "s3cret-s3cret-s3cret", files)
    block = json.loads(text.split("cluster: ", 1)[1])
    assert block["tls"] == {
        "cert_file": "/d/route.pem",
        "key_file": "/d/route.key",
        "ca_file": "/c/cluster-ca.pem",
        "verify": True,
        "timeout": cluster.ROUTE_TLS_TIMEOUT_S,
    }
    assert block["authorization"]["password"] == "s3cret-s3cret-s3cret"  # the secret is kept beside TLS
    assert "tls" not in cluster.cluster_config(up, None)


def test_the_route_certificate_names_this_hosts_route_addresses(tmp_path: Path) -> None:
    ca = cluster.ensure_cluster_ca(tmp_path / "creds")
    routes = ["127.0.0.1:7001", "localhost:7002", "192.0.2.7:6222"]  # the last is another host's
    up = UpConfig(cluster="c", host="127.0.0.1", cluster_port=7001, routes=routes, server_name="h1.mesh")
    files = cluster.ensure_route_certificate(up, ca, tmp_path / "data" / cluster.ROUTE_TLS_DIR)
    assert certificate_names(files.cert) == {"127.0.0.1", "localhost", "h1.mesh"}
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # both ends of a route
    assert files.key.stat().st_mode & 0o777 == 0o600
    first = files.cert.read_bytes()
    assert cluster.ensure_route_certificate(up, ca, files.cert.parent).cert.read_bytes() == first  # kept
    wildcard = UpConfig(cluster="c", host="0.0.0.0", routes=["192.0.2.7:6222"], server_name="h_1")
    assert cluster.route_names(wildcard) == ()  # nothing names it: neither address nor a DNS-safe name
    moved = UpConfig(cluster="c", host="127.0.0.2", routes=routes, server_name="h1.mesh")
    assert "127.0.0.2" in certificate_names(cluster.ensure_route_certificate(moved, ca, files.cert.parent).cert)
    # A new CA (the folder made again): the certificate is issued anew from it.
    (ca.parent / cluster.CLUSTER_CA_KEY_FILE).unlink()
    ca.unlink()
    cluster.ensure_cluster_ca(ca.parent)
    again = cluster.ensure_route_certificate(moved, ca, files.cert.parent)
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca.read_bytes())
    )


def test_route_tls_is_on_with_the_ca_and_refused_without_it_when_asked(tmp_path: Path) -> None:
    creds, data = tmp_path / "creds", tmp_path / "data"
    auth.ensure_seeds(creds)  # a folder from before the CA
    up = UpConfig(cluster="c", routes=["127.0.0.1:7001"], server_name="h1")
    assert cluster.route_tls(up, creds, data) is None  # plain routes, as before (with a warning)
    assert cluster.route_tls(up, None, data) is None  # no identities at all (--no-auth on loopback)
    for folder, fix in ((creds, f"aimesh auth init {creds}"), (None, "aimesh auth init DIR")):
        with pytest.raises(ConfigError, match=f"cluster_tls.*{fix}.*cluster_tls_cert"):
            cluster.route_tls(UpConfig(cluster="c", cluster_tls=True), folder, data)
    ca = cluster.ensure_cluster_ca(creds)
    files = cluster.route_tls(up, creds, data)
    assert files is not None and files.ca == ca and files.cert.parent == data / cluster.ROUTE_TLS_DIR
    assert cluster.route_tls(UpConfig(cluster="c", cluster_tls=False), creds, data) is None
    own = {"cluster_tls_cert": str(files.cert), "cluster_tls_key": str(files.key), "cluster_tls_ca": str(ca)}
    assert cluster.route_tls(UpConfig(cluster="c", **own), None, data) == files
    with pytest.raises(ConfigError, match=r"cluster_tls_ca.*no file"):
        cluster.route_tls(UpConfig(cluster="c", **own | {"cluster_tls_ca": str(tmp_path / "nope.pem")}), None, data)


def test_cluster_tls_flags_and_settings() -> None:
    args = build_parser().parse_args(["up", "--cluster", "c", "--no-cluster-tls"])
    assert args.cluster_tls is False
    args = build_parser().parse_args(["up", "--cluster", "c", "--cluster-tls", "--cluster-tls-ca", "ca.pem"])
    assert (args.cluster_tls, args.cluster_tls_ca) == (True, "ca.pem")
    assert load_up_config(env={"AIMESH_UP_CLUSTER_TLS": "true"}, overrides={"cluster": "c"}).cluster_tls is True
    assert load_up_config(env={}, overrides={"cluster": "c"}).cluster_tls is None
    with pytest.raises(ConfigError, match=r"cluster_tls_cert needs .*cluster_tls_key, cluster_tls_ca"):
        load_up_config(env={}, overrides={"cluster": "c", "cluster_tls_cert": "a.pem"})
    with pytest.raises(ConfigError, match="cluster_tls is false"):
        own = {"cluster_tls_cert": "a", "cluster_tls_key": "b", "cluster_tls_ca": "c"}
        load_up_config(env={}, overrides={"cluster": "c", "cluster_tls": False, **own})


async def _monitor(monitor_url: str, endpoint: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"{monitor_url}/{endpoint}") as resp:
        body: dict[str, object] = await resp.json()
        return body


async def _routed_to(monitor_url: str) -> set[str]:
    """The servers ``/routez`` lists routes to (empty while the server is not up)."""
    try:
        routes = (await _monitor(monitor_url, "routez")).get("routes") or []
    except aiohttp.ClientError:
        return set()
    assert isinstance(routes, list)
    return {r["remote_name"] for r in routes}


def _route_info(port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    """The TLS version the route port speaks at once (nothing in the clear first) and what it
    sends over it: its INFO, or nothing when it refused our certificate."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        try:
            return tls.version() or "", tls.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return tls.version() or "", b""


def _succeeds(call: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: ``call`` went through (JetStream may not have a leader yet)."""

    async def check() -> bool:
        try:
            await call()
        except (JetStreamError, nats.errors.TimeoutError):
            return False
        return True

    return check


def _routes_to(
    servers: list[tuple[subprocess.Popen[bytes], str, str]], i: int, log: Path, others: set[str]
) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: server ``i`` routes to exactly ``others`` (it must not exit)."""
    proc, _, monitor = servers[i]

    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        return await _routed_to(monitor) == others

    return check


@pytest.mark.timeout(90)
async def test_aimesh_up_forms_the_cluster_over_mutual_tls(tmp_path: Path, names: Names) -> None:
    """Three `aimesh up --cluster --credentials` (the folder of `aimesh auth init`): the routes
    are TLS, certificates checked both ways, and an R3 stream is replicated over them."""
    creds = tmp_path / "creds"
    _auth_init(creds)
    cluster_ports = [free_port() for _ in range(3)]
    routes = ",".join(f"127.0.0.1:{p}" for p in cluster_ports)
    no_services = [flag for service in NO_SERVICES for flag in (f"--{service}", "0")]
    servers: list[tuple[subprocess.Popen[bytes], str, str]] = []
    for i, cluster_port in enumerate(cluster_ports):
        port, http_port = free_port(), free_port()
        command = [
            *AIMESH, "up", "--prefix", names.prefix, "--data-dir", str(tmp_path / f"h{i}"), "--port", str(port),
            "--http-port", str(http_port), "--credentials", str(creds), "--cluster", "tlsloop", "--cluster-port",
            str(cluster_port), "--routes", routes, "--server-name", f"h{i}", *no_services,
        ]  # fmt: skip
        with open(tmp_path / f"up-h{i}.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        servers.append((proc, f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"))
    try:
        for i, (_, _, monitor) in enumerate(servers):
            others = {f"h{j}" for j in range(3)} - {f"h{i}"}
            await eventually(_routes_to(servers, i, tmp_path / f"up-h{i}.log", others), 30, f"h{i}'s routes")
            block = (await _monitor(monitor, "varz"))["cluster"]
            assert isinstance(block, dict) and block["tls_required"] is True and block["tls_verify"] is True
        # The route port speaks TLS, with a certificate of the cluster CA naming 127.0.0.1.
        ca = creds / cluster.CLUSTER_CA_FILE
        route_cert = tmp_path / "h0" / cluster.ROUTE_TLS_DIR
        context = client_context(str(ca), str(route_cert / "route.pem"), str(route_cert / "route.key"))
        version, info = await asyncio.to_thread(_route_info, cluster_ports[1], context)
        assert version in ("TLSv1.2", "TLSv1.3") and info.startswith(b"INFO ")
        assert json.loads(info.split(b" ", 1)[1])["tls_verify"] is True
        no_certificate = client_context(str(ca))  # trusts the server, shows no certificate: refused
        assert (await asyncio.to_thread(_route_info, cluster_ports[1], no_certificate))[1] == b""
        # JetStream replicates over the routes: a stream of three replicas, each current.
        operator = MeshConfig(
            nats_url=",".join(url for _, url, _ in servers),
            prefix=names.prefix,
            nats_nkey=str(auth.seed_path(creds, "operator")),
        )
        nc = await connect(operator, "test-cluster-tls", role="operator")
        try:
            js = nc.jetstream(timeout=10)
            stream = StreamConfig(name=names.data_stream, subjects=[f"{names.prefix}.tlstest.>"], num_replicas=3)
            once = {"Nats-Msg-Id": "tls-1"}  # a publish retried after a lost ack is stored once
            # The meta leader, then the stream's leader, are elected a few seconds after the routes.
            await eventually(_succeeds(lambda: js.add_stream(stream)), 30, "the R3 stream made")
            await eventually(
                _succeeds(lambda: js.publish(f"{names.prefix}.tlstest.x", b"tls", headers=once)), 30, "a message stored"
            )

            async def replicated() -> bool:
                info = await js.stream_info(names.data_stream)
                peers = (info.cluster.replicas if info.cluster is not None else None) or []
                return info.state.messages == 1 and len(peers) == 2 and all(p.current for p in peers)

            await eventually(replicated, 20, "the stream's three replicas, current")
        finally:
            await nc.close()
    finally:
        for proc, _, _ in servers:
            proc.terminate()
        for proc, _, _ in servers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_server_with_a_certificate_of_another_ca_cannot_join(tmp_path: Path, names: Names) -> None:
    """Two members and an intruder holding the folder's seeds and secret, and trusting the cluster
    CA, but whose route certificate another CA signed: the members refuse its routes both ways."""
    creds = tmp_path / "creds"
    auth.ensure_seeds(creds)
    cluster.ensure_cluster_ca(creds)
    rogue = tmp_path / "rogue"
    make_ca(rogue / "ca.pem", rogue / "ca.key", "not the cluster CA", days=1)
    issue_certificate(
        rogue / "ca.pem", rogue / "ca.key", rogue / "route.pem", rogue / "route.key", ("127.0.0.1",),
        common_name="h2", client=True,
    )  # fmt: skip
    own_pki = {
        "cluster_tls_cert": str(rogue / "route.pem"),
        "cluster_tls_key": str(rogue / "route.key"),
        "cluster_tls_ca": str(creds / cluster.CLUSTER_CA_FILE),
    }
    supervisors = loopback_cluster(tmp_path, names, "tlsloop", creds, {2: own_pki})
    stop = asyncio.Event()
    runs = [asyncio.create_task(s.run(stop)) for s in supervisors]
    try:
        for s in supervisors:
            await asyncio.wait_for(s.started.wait(), 20)
        monitors = [s.server.monitor_url if s.server else "" for s in supervisors]
        logs = [tmp_path / f"h{i}" / "nats-server.log" for i in range(3)]

        async def refused() -> bool:
            # The members route to each other, and each has refused the intruder's certificate.
            routed = [await _routed_to(m) for m in monitors[:2]]
            seen = [log.read_text(errors="replace") for log in logs[:2]]
            return routed == [{"h1"}, {"h0"}] and all("unknown authority" in text for text in seen)

        await eventually(refused, 30, "the members routed together, the intruder refused")
        await asyncio.sleep(2)  # the intruder keeps dialling: still out
        assert [await _routed_to(m) for m in monitors] == [{"h1"}, {"h0"}, set()]
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
