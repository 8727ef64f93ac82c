"""A NATS cluster of embedded servers (``aimesh up --cluster NAME --routes host:port,...``).

- :func:`cluster_config` is the ``cluster`` block of a server's config: its name, where it
  listens for routes, the routes it dials and, when the mesh has identities, the route
  credentials (a shared secret in the identities directory, ``cluster.secret``, which travels
  with the role seeds from host to host).
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
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError
from nats.js.errors import Error as JetStreamError

from shared.config import UpConfig, split_host_port
from shared.errors import ConfigError

log = logging.getLogger(__name__)

ROUTE_USER = "aimesh-route"
ROUTE_SECRET_FILE = "cluster.secret"
ROUTE_PING_INTERVAL = "2s"
ROUTE_PING_MAX = 3
MAX_REPLICAS = 3  # what JetStream clusters commonly run; more costs writes and buys little


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


def server_name(up: UpConfig) -> str:
    """This server's name in the cluster (JetStream needs a unique, stable one per server)."""
    if up.server_name:
        return up.server_name
    host = "any" if up.host in ("0.0.0.0", "::", "") else up.host
    raw = f"{socket.gethostname()}-{host}-{up.port}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)


def cluster_config(up: UpConfig, secret: str | None) -> str:
    """The ``cluster`` block (nats-server config; JSON values are valid there)."""
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
