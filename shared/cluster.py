"""A NATS cluster of embedded servers (``aimesh up --cluster NAME --routes host:port,...``).

- :func:`cluster_config` is the ``cluster`` block of a server's config: its name, where it
  listens for routes, the routes it dials and, when the mesh has identities, the route
  credentials (a shared secret in the identities directory, ``cluster.secret``, which travels
  with the role seeds from host to host) and the routes' TLS (:func:`route_tls`).
- Routes over TLS, certificates checked both ways: ``aimesh auth init`` makes a cluster CA
  (:func:`ensure_cluster_ca`, next to ``cluster.secret``); each server issues itself a route
  certificate signed by it, for its route addresses, under ``<data_dir>/cluster-tls``.  Or the
  operator's own files (``[up] cluster_tls_cert/key/ca``).
- :func:`cluster_size` counts the servers a routes list names (this host's own entry once);
  :func:`default_replicas` is the JetStream replica count such a cluster holds: ``min(3, size)``.
- :func:`ensure_replicas` raises a stream's (a KV bucket's, an object store's) replica count to
  the configured one when it was created with fewer (data made by a single server before the
  cluster was formed); when the server cannot (not clustered, too few servers) it logs the
  command that does it by hand.  Replicas are never lowered.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError
from nats.js.errors import Error as JetStreamError

from shared.config import UpConfig, split_host_port
from shared.errors import ConfigError
from shared.tls import certificate_covers, issue_certificate, make_ca

log = logging.getLogger(__name__)

ROUTE_USER = "aimesh-route"
ROUTE_SECRET_FILE = "cluster.secret"
ROUTE_PING_INTERVAL = "2s"
ROUTE_PING_MAX = 3
MAX_REPLICAS = 3  # what JetStream clusters commonly run; more costs writes and buys little
CLUSTER_CA_FILE = "cluster-ca.pem"
CLUSTER_CA_KEY_FILE = "cluster-ca.key"
CLUSTER_CA_DAYS = 3650  # a CA copied to every host: renewing it means copying it again
ROUTE_TLS_DIR = "cluster-tls"  # under the data dir: this server's route certificate and key
ROUTE_TLS_TIMEOUT_S = 5  # the handshake's bound (nats-server's default 2 s is tight on a busy host)
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class RouteTls:
    """The files of the cluster block's ``tls``: this server's route certificate and key, and
    the CA every route's certificate must be signed by."""

    cert: Path
    key: Path
    ca: Path


def route_secret(directory: Path) -> str:
    """The routes' shared password, created (0600) in the identities directory if missing."""
    path = directory / ROUTE_SECRET_FILE
    try:
        if not path.is_file():
            from shared.auth import write_private

            write_private(path, secrets.token_urlsafe(32).encode())
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others: chmod 600 {path}")
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot keep the cluster secret in {directory}: {exc.strerror or exc}") from None
    if len(secret) < 16 or not secret.isascii() or not all(c.isalnum() or c in "-_" for c in secret):
        raise ConfigError(f"{path}: the cluster secret must be 16 or more letters, digits, '-' or '_'")
    return secret


def ensure_cluster_ca(directory: Path) -> Path:
    """The cluster CA's certificate in the identities directory, the CA made there (its key 0600)
    when missing; an existing one is kept, since every host's route certificate hangs on it."""
    cert, key = directory / CLUSTER_CA_FILE, directory / CLUSTER_CA_KEY_FILE
    if cert.is_file() != key.is_file():
        have, lost = (cert, key) if cert.is_file() else (key, cert)
        raise ConfigError(
            f"{have} is there without {lost}: copy both from another host's folder, or remove {have} and "
            f"run `aimesh auth init {directory}` for a new CA (then copy the folder to every host again)"
        )
    if not cert.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        make_ca(cert, key, "aimesh cluster CA", days=CLUSTER_CA_DAYS)
    if key.stat().st_mode & 0o077:
        raise ConfigError(f"{key} is readable by others: chmod 600 {key}")
    return cert


def route_tls(up: UpConfig, credentials: Path | None, data_dir: Path) -> RouteTls | None:
    """This server's route TLS files, or None for plain routes: the operator's own files when
    given; else a certificate from the cluster CA in ``credentials`` (issued into ``data_dir``),
    when the CA is there or ``cluster_tls`` asks for it (an error, naming the fix, without it)."""
    if up.cluster_tls is False:
        return None
    if up.cluster_tls_cert and up.cluster_tls_key and up.cluster_tls_ca:
        return _own_route_tls(up.cluster_tls_cert, up.cluster_tls_key, up.cluster_tls_ca)
    if credentials is not None and (credentials / CLUSTER_CA_FILE).is_file():
        return ensure_route_certificate(up, ensure_cluster_ca(credentials), data_dir / ROUTE_TLS_DIR)
    fix = (
        f"run `aimesh auth init {credentials}` (it keeps the seeds and {ROUTE_SECRET_FILE}, and adds the CA), "
        "then copy the folder to every host again"
        if credentials is not None
        else "make one with `aimesh auth init DIR` and pass --credentials DIR on every host"
    )
    if up.cluster_tls:
        raise ConfigError(
            f"[up] cluster_tls (--cluster-tls) needs the cluster CA ({CLUSTER_CA_FILE}) in the credentials "
            f"folder: {fix}; or give your own files ([up] cluster_tls_cert, cluster_tls_key, cluster_tls_ca)"
        )
    log.warning("the routes between NATS servers are not encrypted (no cluster CA): %s", fix)
    return None


def ensure_route_certificate(up: UpConfig, ca: Path, directory: Path) -> RouteTls:
    """This server's route certificate signed by the cluster CA ``ca`` (its key beside it), for
    :func:`route_names`: kept while it covers them and has 30 days left, else issued anew."""
    files = RouteTls(cert=directory / "route.pem", key=directory / "route.key", ca=ca)
    names = route_names(up)
    if not certificate_covers(files.cert, files.key, names, ca):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        ca_key = ca.with_name(CLUSTER_CA_KEY_FILE)
        issue_certificate(ca, ca_key, files.cert, files.key, names, common_name=server_name(up), client=True)
        log.info("issued the route certificate %s for %s", files.cert, ", ".join(names))
    return files


def route_names(up: UpConfig) -> tuple[str, ...]:
    """What peers dial this server's routes by: its listen address (unless a wildcard), the
    entries of ``routes`` naming this host, and the server name.  A route's TLS checks the
    dialled host against the certificate, so each must be in it."""
    names = [] if up.host in WILDCARDS else [up.host]
    names += [host for host, _ in _routes(up.routes) if is_local_address(host)]
    name = server_name(up)
    if all(c.isalnum() or c in "-." for c in name):  # a DNS name ('_' is not)
        names.append(name)
    return tuple(dict.fromkeys(names))


def _own_route_tls(cert: str, key: str, ca: str) -> RouteTls:
    files = RouteTls(cert=Path(cert).resolve(), key=Path(key).resolve(), ca=Path(ca).resolve())
    for setting, path in (("cert", files.cert), ("key", files.key), ("ca", files.ca)):
        if not path.is_file():
            raise ConfigError(f"[up] cluster_tls_{setting} (--cluster-tls-{setting}): no file {path}")
    return files


def server_name(up: UpConfig) -> str:
    """This server's name in the cluster (JetStream needs a unique, stable one per server)."""
    if up.server_name:
        return up.server_name
    host = "any" if up.host in WILDCARDS else up.host
    raw = f"{socket.gethostname()}-{host}-{up.port}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)


def cluster_config(up: UpConfig, secret: str | None, tls: RouteTls | None = None) -> str:
    """The ``cluster`` block (nats-server config; JSON values are valid there).  With ``tls``
    every route is TLS, both ends presenting a certificate of the CA (``verify``); the secret,
    when there is one, is kept too: a leaked route key alone does not let a server in."""
    assert up.cluster is not None
    block: dict[str, object] = {
        "name": up.cluster,
        "listen": f"{_bracket(up.host)}:{up.cluster_port}",
        # A route whose peer stopped answering (a cut link sends no reset) is closed after
        # ROUTE_PING_MAX missed pings, not nats-server's 2 min × 2: its interest (the cut-off
        # host's workers) leaves the cluster, and the route is dialled again until it heals.
        "ping_interval": ROUTE_PING_INTERVAL,
        "ping_max": ROUTE_PING_MAX,
    }
    credentials = ""
    if secret is not None:
        block["authorization"] = {"user": ROUTE_USER, "password": secret, "timeout": 5}
        credentials = f"{ROUTE_USER}:{secret}@"
    if tls is not None:
        block["tls"] = {
            "cert_file": str(tls.cert),
            "key_file": str(tls.key),
            "ca_file": str(tls.ca),
            "verify": True,
            "timeout": ROUTE_TLS_TIMEOUT_S,
        }
    if up.routes:
        block["routes"] = [f"nats-route://{credentials}{_bracket(h)}:{p}" for h, p in _routes(up.routes)]
    return f"server_name: {json.dumps(server_name(up))}\ncluster: {json.dumps(block, indent=2)}\n"


def cluster_size(up: UpConfig) -> int:
    """The servers of the cluster: the distinct routes, plus this one unless it is among them."""
    if up.cluster is None:
        return 1
    routes = set(_routes(up.routes))
    own = any(port == up.cluster_port and is_local_address(host) for host, port in routes)
    return len(routes) + (0 if own else 1)


def default_replicas(servers: int) -> int:
    return max(1, min(MAX_REPLICAS, servers))


def is_local_address(host: str) -> bool:
    """Whether ``host`` names an address of this machine (one a socket can be bound to)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind((address[0], 0))
                return True
            except OSError:
                continue
    return False


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host:port`` (the interface packets to it leave
    by): what a peer on that network reaches this host at.  Sends nothing (a UDP "connect")."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.connect(address)
        local: str = s.getsockname()[0]
    return local


def _routes(routes: Iterable[str]) -> list[tuple[str, int]]:
    return [split_host_port(r, "[up] routes (--routes)") for r in routes]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_raised: set[tuple[str, int]] = set()  # checked in this process already: once is enough


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> int:
    """Raise ``stream``'s replicas to ``replicas`` if it has fewer; returns the count it has
    (0: no such stream).  Checked once per process and stream."""
    if replicas <= 1 or (stream, replicas) in _raised:
        return replicas
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return 0
    config = info.config
    have = config.num_replicas or 1
    if have >= replicas:
        _raised.add((stream, replicas))
        return have
    config.num_replicas = replicas
    try:
        await js.update_stream(config)
    except (JetStreamError, NatsError) as exc:  # refused; NatsError: a timeout (no permission)
        log.warning(
            "stream %s has %d replica(s), %d configured, and the server would not raise it (%s): "
            "once the cluster has %d servers run `nats stream edit %s --replicas %d` (or restart this service)",
            stream,
            have,
            replicas,
            getattr(exc, "description", None) or exc,
            replicas,
            stream,
            replicas,
        )
        return have
    log.info("stream %s: replicas raised from %d to %d", stream, have, replicas)
    _raised.add((stream, replicas))
    return replicas


async def declare_stream(js: JetStreamContext, config: StreamConfig, replicas: int) -> None:
    """Create the stream, or update it to ``config`` if it exists; ``replicas`` unless the config
    names a count.  An existing stream's replicas are raised, never lowered; when the server
    cannot raise them, the rest of the update is made and the command to run is logged."""
    if config.num_replicas is None:
        config.num_replicas = replicas
    try:
        await js.add_stream(config)
        return
    except APIError as exc:
        # 10058: the name is in use with a different config; a single server refuses more than
        # one replica (10074) before it looks for the stream.
        if exc.err_code not in (10058, 10074):
            raise
        try:
            existing = (await js.stream_info(config.name or "")).config.num_replicas or 1
        except NotFoundError:
            raise exc from None
    wanted = config.num_replicas
    config.num_replicas = max(existing, wanted)
    try:
        await js.update_stream(config)
    except APIError:
        if existing >= wanted:
            raise
        config.num_replicas = existing  # the server cannot hold more (not clustered, too few servers)
        await js.update_stream(config)
        await ensure_replicas(js, config.name or "", wanted)  # logs what to run


def replicas_env(
    up: UpConfig, nats_url: str | None, env: dict[str, str], mesh_table: dict[str, object]
) -> dict[str, str]:
    """``AIMESH_JS_REPLICAS`` for the services `aimesh up` starts, unless configured: what this
    host's cluster holds, or, for services only against several NATS URLs, min(3, their count)."""
    if "AIMESH_JS_REPLICAS" in os.environ or "AIMESH_JS_REPLICAS" in env or "js_replicas" in mesh_table:
        return {}
    servers = cluster_size(up) if nats_url is None else len([u for u in nats_url.split(",") if u.strip()])
    replicas = default_replicas(servers)
    return {"AIMESH_JS_REPLICAS": str(replicas)} if replicas > 1 else {}
