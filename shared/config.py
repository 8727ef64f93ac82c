"""Configuration: defaults, then an optional TOML file, then ``AIMESH_*`` environment variables.

The TOML file is ``$AIMESH_CONFIG`` if set, else ``./aimesh.toml`` if present.  Each settings
class reads one table of it and one family of variables::

    [mesh]                      # MeshConfig: AIMESH_NATS_URL, AIMESH_PREFIX, ...
    nats_url = "nats://10.0.0.5:4222"
    [router]                    # RouterConfig (services/router): AIMESH_ROUTER_PORT, ...
    port = 8080
    [up]                        # UpConfig (aimesh up): AIMESH_UP_TRAINER, ...
    trainer = 2

The standard ``NATS_URL`` variable is honoured when ``AIMESH_NATS_URL`` is not set.  A value
that does not fit its type raises :class:`ConfigError` naming the setting and its source.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from shared.errors import ConfigError

S = TypeVar("S", bound=msgspec.Struct)

# The largest message on the bus: nats-server's max_payload.  Its own default is 1 MiB; the
# embedded server gets 32 MiB, so that a router body of max_body_bytes (16 MiB) fits with room
# for the encoding; nats-server refuses more than 64 MiB (and max_payload above max_pending).
DEFAULT_NATS_MAX_PAYLOAD = 32 * 1024 * 1024
NATS_MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024


class MeshConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What every service and tool needs to join a mesh."""

    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds: str | None = None  # a NATS credentials file (JWT + nkey)
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    prefix: str = "aimesh"
    instance: str | None = None  # an instance id; generated when unset
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    health_port: int | None = None  # liveness/readiness over HTTP; 0 picks a free port
    health_host: str = "127.0.0.1"
    drain_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    js_replicas: int = 1  # JetStream replicas for streams and buckets: 1 locally, 3 on a cluster
    max_concurrency: int = 64  # default per actor
    mailbox_size: int = 256  # default per actor
    # Share of root traces recorded when OTEL_TRACES_SAMPLER is unset (parent-based: a message
    # that carries a trace context always follows its caller's sampling decision).  1% keeps
    # tracing cheap on a hot path; `aimesh up` records every trace for local development.
    trace_sample_ratio: float = 0.01
    # Metric snapshots on <prefix>.metrics.<service>.<instance> this often; 0 turns them off.
    metrics_interval_s: float = 2.0
    # Recorded spans also go to the metrics service (<prefix>.spans.<service>) for the dashboard.
    trace_to_mesh: bool = True
    # A NATS nkey seed file: this process's identity on the bus (`aimesh up` and `aimesh auth
    # init` write one per role; the server's authorization block holds only the public keys).
    nats_nkey: str | None = None
    # Model factories are imported only from these packages (and their submodules), besides the
    # built-in `zoo`: a registry entry or a training request naming anything else is refused
    # before any import.
    model_packages: list[str] = []


def config_path(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    explicit = env.get("AIMESH_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"AIMESH_CONFIG={explicit}: no such file")
        return path
    default = Path("aimesh.toml")
    return default if default.is_file() else None


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_section(
    cls: type[S],
    section: str,
    *,
    env_prefix: str,
    env: Mapping[str, str] | None = None,
    toml: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Build ``cls`` from TOML table ``section``, then ``{env_prefix}{FIELD}`` variables, then
    ``overrides`` (command-line flags), each layer winning over the one before."""
    env = os.environ if env is None else env
    toml = read_toml(config_path(env)) if toml is None else toml
    table = toml.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in the config file must be a table")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    fields = set(cls.__struct_fields__)
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"[{section}] {key}: unknown setting (known: {', '.join(sorted(fields))})")
        values[key] = value
        sources[key] = f"[{section}] {key} in the config file"
    list_fields = {f.name for f in msgspec.structs.fields(cls) if typing.get_origin(f.type) is list or f.type is list}
    for field in fields:
        var = f"{env_prefix}{field.upper()}"
        if var in env:
            raw = env[var]
            values[field] = None if raw == "" else _env_list(raw) if field in list_fields else raw
            sources[field] = var
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            sources[key] = f"--{key.replace('_', '-')}"
    try:
        # strict=False lets "8080" from the environment become an int, "true" a bool.
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from exc


def _env_list(raw: str) -> Any:
    """A list from an environment variable: JSON (``["a","b"]``) or comma-separated."""
    if raw.lstrip().startswith("["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return [item.strip() for item in raw.split(",") if item.strip()]


def _explain(exc: msgspec.ValidationError, sources: Mapping[str, str]) -> str:
    text = str(exc)
    # msgspec says "... - at `$.field`"; name the source the user must fix.
    if "`$." in text:
        field = text.rsplit("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0].split(".", 1)[0]
        if field in sources:
            return f"{sources[field]}: {text.rsplit(' - at ', 1)[0]}"
    return text


def load_mesh_config(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> MeshConfig:
    env = os.environ if env is None else env
    if "AIMESH_NATS_URL" not in env and env.get("NATS_URL"):
        overrides = {"nats_url": env["NATS_URL"], **(overrides or {})}
    return load_section(MeshConfig, "mesh", env_prefix="AIMESH_", env=env, overrides=overrides)


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The HTTP gateway: table ``[router]``, variables ``AIMESH_ROUTER_*``."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port (advertised in discovery metadata as "http")
    max_body_bytes: int = 16 * 1024 * 1024
    max_concurrency: int = 1024  # HTTP requests in flight; more get 429 with Retry-After
    timeout_s: float = 30.0  # default deadline of a request (header Aimesh-Timeout-Ms overrides, lower only)
    # Inference requests for the same version that arrive in one turn of the event loop go to the
    # workers as one request (rows concatenated, outputs split back; shared/coalesce.py).
    coalesce: bool = True
    # Hedging (shared/hedge.py): an inference with no answer after its version's p95 latency is
    # sent again (the first answer wins), at most this many extra requests per request overall
    # (10 may be saved up for a burst); 0 turns it off.
    hedge_budget: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.5
    # Slow clients: a request head (line and headers) not in within header_timeout_s of the
    # connection's opening or its previous response closes the connection; a body not in within
    # body_timeout_s is a 408 and the connection is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # API keys, "KEY:scope" or "sha256:<hex digest of KEY>:scope" (shared/apikeys.py), scope infer
    # or admin (admin may also infer; /admin/* needs admin).  Empty: no keys asked.
    api_keys: list[str] = []
    # HTTPS: PEM certificate (chain) and key.  `aimesh up --tls` sets both from its local CA.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Listening beyond loopback with no API keys is refused unless this is set.
    insecure: bool = False


class MetricsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The metrics service: table ``[metrics]``, variables ``AIMESH_METRICS_*``."""

    host: str = "127.0.0.1"
    port: int = 9464  # 0 picks a free port
    scrape_interval_s: float = 5.0  # queue lag is read this often (every tick_s when autoscaling)
    tick_s: float = 1.0  # experiments and the autoscaler are evaluated this often
    history_s: float = 900.0  # how much of the time series the dashboard keeps
    max_exposures: int = 200_000  # request ids remembered for joining feedback to a variant
    # API keys for the dashboard and /api/*, "KEY:scope" or "sha256:<hex digest of KEY>:scope"
    # with scope read or admin (shared/apikeys.py).  Empty: no keys asked.
    api_keys: list[str] = []
    # Prometheus's /metrics needs no key even when api_keys is set (scrapers rarely send one).
    metrics_open: bool = True
    # Listening beyond loopback with no API keys is refused unless this is set.
    insecure: bool = False


class AutoscaleConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The autoscaler of the inference pool: table ``[autoscale]``, variables ``AIMESH_AUTOSCALE_*``.

    Desired replicas = ceil(max(in-flight / target_in_flight, queue lag / target_lag)), raised
    by one while p99 is over ``p99_ceiling_ms``; within [min_replicas, max_replicas]; up at once
    (after ``up_cooldown_s`` since the last change), down only after ``down_cooldown_s`` of
    lower demand; to zero (when ``min_replicas`` is 0) after ``idle_to_zero_s`` with no requests
    and nothing queued.  From zero, one queued durable request brings one worker back."""

    enabled: bool = False
    pool: str = "inference"
    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight: float = 16.0  # requests in flight per worker
    target_lag: float = 64.0  # durable requests pending + unacknowledged per worker
    p99_ceiling_ms: float | None = None
    up_cooldown_s: float = 5.0
    down_cooldown_s: float = 30.0
    idle_to_zero_s: float = 60.0
    # No decisions until the metrics service has watched this long: right after it starts it has
    # not heard from every worker (a worker still importing torch sends nothing yet), and a pool
    # judged on that partial view would be scaled down.
    warmup_s: float = 20.0
    # Several metrics instances may run with autoscaling on: only the holder of a lease in the
    # experiments bucket decides.  Another takes over when it has not been renewed this long.
    lease_s: float = 5.0


def load_autoscale_config(env: Mapping[str, str] | None = None) -> AutoscaleConfig:
    return load_section(AutoscaleConfig, "autoscale", env_prefix="AIMESH_AUTOSCALE_", env=env)


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The ingest service: table ``[ingest]``, variables ``AIMESH_INGEST_*``."""

    job_ack_wait_s: float = 30.0  # a job whose instance died is taken over after this long
    max_in_flight: int = 64  # batch publishes awaiting their JetStream ack
    parse_threads: int = 2  # CSV chunks parsed at once
    # Directories a submitted path may be read from (symlinks resolved).  Empty: the working
    # directory of the ingest process; `aimesh up` adds its data dir.
    roots: list[str] = []
    # The largest upload (`IngestRequest.object`) the service copies into its temp dir and ingests.
    max_upload_bytes: int = 1 << 30


class TrainerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A trainer agent: table ``[trainer]``, variables ``AIMESH_TRAINER_*``."""

    # The address other nodes reach this one at (rank 0's TCPStore, gloo); a pod IP on k8s.  Empty:
    # this host's address on the route to its NATS server (127.0.0.1 when NATS is on loopback).
    host: str = ""
    heartbeat_s: float = 1.0
    node_ttl_s: float = 5.0  # a node whose heartbeat is older than this is gone
    threads: int = 1  # torch intra-op threads per rank


def load_trainer_config(env: Mapping[str, str] | None = None) -> TrainerConfig:
    return load_section(TrainerConfig, "trainer", env_prefix="AIMESH_TRAINER_", env=env)


def load_ingest_config(env: Mapping[str, str] | None = None) -> IngestConfig:
    return load_section(IngestConfig, "ingest", env_prefix="AIMESH_INGEST_", env=env)


class InferenceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """An inference worker: table ``[inference]``, variables ``AIMESH_INFERENCE_*``."""

    durable_ack_wait_s: float = 10.0  # a durable request whose worker died is served again after this


def load_inference_config(env: Mapping[str, str] | None = None) -> InferenceConfig:
    return load_section(InferenceConfig, "inference", env_prefix="AIMESH_INFERENCE_", env=env)


def load_router_config(env: Mapping[str, str] | None = None) -> RouterConfig:
    return load_section(RouterConfig, "router", env_prefix="AIMESH_ROUTER_", env=env)


def load_metrics_config(env: Mapping[str, str] | None = None) -> MetricsConfig:
    return load_section(MetricsConfig, "metrics", env_prefix="AIMESH_METRICS_", env=env)


class UpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``aimesh up``: table ``[up]``, variables ``AIMESH_UP_*``, flags of the same names."""

    ingest: int = 1
    trainer: int = 2
    inference: int = 2
    router: int = 1
    metrics: int = 1
    data_dir: str = ".aimesh"
    port: int = 4222  # the embedded nats-server's client port; 0 picks a free one
    # Identities on the bus: the embedded server admits only the mesh's nkeys (one per role,
    # generated into <data_dir>/auth).  false runs an open bus, for debugging only.
    auth: bool = True
    credentials: str | None = None  # a directory of <role>.nk seeds for an external NATS
    # The embedded server's listen address.  Beyond loopback it needs auth and TLS, or `insecure`.
    host: str = "127.0.0.1"
    # TLS on the bus and the gateway with a local CA made under <data_dir>/tls (clients trust it).
    tls: bool = False
    insecure: bool = False  # accept listening beyond loopback without authentication and TLS
    http_port: int = 8222  # its monitoring port; 0 picks a free one
    # The embedded server's max_payload: the largest message (request, reply, durable request or
    # result) the bus carries, in bytes.  Clients read it from the server; over it is a 413.
    nats_max_payload: Annotated[int, msgspec.Meta(ge=1024, le=NATS_MAX_PAYLOAD_LIMIT)] = DEFAULT_NATS_MAX_PAYLOAD
    restart_backoff_s: float = 0.5  # doubled per crash, capped at restart_backoff_max_s
    restart_backoff_max_s: float = 30.0
    crash_loop_restarts: int = 5  # this many crashes within crash_loop_window_s is a crash loop
    crash_loop_window_s: float = 60.0
    # A NATS cluster (docs/cluster.md): the embedded server joins cluster ``cluster`` (a name, the
    # same on every host), listens for routes on ``cluster_port`` and dials ``routes`` (host:port
    # of every server, the same list on each host; a host's own entry is ignored).
    cluster: str | None = None
    cluster_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 6222
    routes: list[str] = []
    server_name: str | None = None  # unique per server of a cluster; default <hostname>-<host>-<port>
    # Routes over TLS, each end's certificate checked against the cluster CA (docs/cluster.md,
    # "Encrypted routes").  Unset: on when the credentials folder holds the CA `aimesh auth init`
    # makes; true: required (an error without a CA); false: plain routes.  Your own PKI: all three
    # of cluster_tls_cert/key/ca (the certificate for server and client use, naming this host).
    cluster_tls: bool | None = None
    cluster_tls_cert: str | None = None
    cluster_tls_key: str | None = None
    cluster_tls_ca: str | None = None


def load_up_config(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> UpConfig:
    up = load_section(UpConfig, "up", env_prefix="AIMESH_UP_", env=env, overrides=overrides)
    _check_cluster(up)
    return up


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); a ConfigError naming ``what`` otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise ConfigError(f"{what}: {address!r} must look like host:port")
    return host, int(port)


def _check_cluster(up: UpConfig) -> None:
    if up.cluster is None:
        if up.routes:
            raise ConfigError("[up] routes (--routes) needs a cluster name: [up] cluster (--cluster)")
        return
    if not up.cluster or not all(c.isalnum() or c in "-_" for c in up.cluster):
        raise ConfigError(f"[up] cluster (--cluster): {up.cluster!r} must be letters, digits, '-' or '_'")
    for route in up.routes:
        split_host_port(route, "[up] routes (--routes)")
    if up.server_name is not None and not (up.server_name and all(c.isalnum() or c in "-_." for c in up.server_name)):
        raise ConfigError(f"[up] server_name: {up.server_name!r} must be letters, digits, '-', '_' or '.'")
    _check_cluster_tls(up)


def _check_cluster_tls(up: UpConfig) -> None:
    own = {"cert": up.cluster_tls_cert, "key": up.cluster_tls_key, "ca": up.cluster_tls_ca}
    given = [k for k, v in own.items() if v]
    if given and len(given) < len(own):
        missing = ", ".join(f"cluster_tls_{k}" for k in own if k not in given)
        raise ConfigError(f"[up] cluster_tls_{given[0]} needs the other files of your PKI too: [up] {missing}")
    if given and up.cluster_tls is False:
        raise ConfigError("[up] cluster_tls is false but cluster_tls_cert/key/ca are given: drop one or the other")


class DurableConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The durable requests' streams: table ``[durable]``, variables ``AIMESH_DURABLE_*``.

    Read by the router and the inference workers, which both declare the streams: give them the
    same values.  The requests stream refuses new requests when full (discard policy ``new``:
    the submitter gets 429 and what was accepted is never dropped for room); a request still
    waiting after ``requests_max_age_s`` expires.  The results stream drops its oldest results
    when full (discard policy ``old``)."""

    requests_max_msgs: int = 100_000  # durable requests waiting at once
    requests_max_bytes: int = 1024**3  # their total size
    requests_max_age_s: float = 24 * 3600.0  # a request not served by then expires
    results_max_bytes: int = 1024**3  # results kept, oldest dropped first
    results_max_age_s: float = 24 * 3600.0  # a result is kept this long


def load_durable_config(env: Mapping[str, str] | None = None) -> DurableConfig:
    return load_section(DurableConfig, "durable", env_prefix="AIMESH_DURABLE_", env=env)
