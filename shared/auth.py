"""Identities on the bus: one NATS nkey per role, each confined to what its role needs.

Why nkeys in the server's ``authorization`` block rather than decentralised JWT accounts: a mesh
is one account, the embedded server already reads a config file, and nkeys give the property
that matters (the server holds only public keys; each process proves its identity by signing a
nonce with a seed file only it is given) without an operator/account/resolver to run.  The cost:
adding or rotating an identity edits the server's config and reloads it (``aimesh auth rotate``
does both for the embedded server).

The permission table below is the one place where a role's reach is written.  It is built from
the mesh's :class:`~shared.names.Names`, so several meshes (prefixes) can share one NATS with
disjoint rights.  Rules of thumb it follows:

- every role subscribes only to its own reply inbox (``_INBOX.<prefix>.<role>.>``: the client is
  told to use that prefix), so no identity can read another's replies;
- services answer requests through ``allow_responses`` (a reply only to a message they were
  sent), never through a publish grant on inboxes;
- JetStream rights are per stream and per verb: *manage* (create/update: services declare what
  they own), *read* (info, get, consumers, acks), *purge*, *delete* (the operator only);
- key/value writes are granted per bucket, and for the experiments bucket per key family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from shared.errors import ConfigError
from shared.names import MICRO_PREFIX, Names, lease_keys, split_keys

SERVICE_ROLES: Final = ("ingest", "trainer", "inference", "router", "metrics")
ROLES: Final = (*SERVICE_ROLES, "supervisor", "operator")
SEED_SUFFIX: Final = ".nk"
# A streamed reply (token generation) sends many messages to one reply subject within the
# request's deadline (30 s at most): the response grant covers that, and no more.
_STREAM_REPLY_MAX: Final = 100_000
_RESPONSE_EXPIRES: Final = "2m"


def inbox_prefix(names: Names, role: str) -> str:
    """The reply-inbox prefix a process of ``role`` must use (its only subscribable inbox)."""
    check_role(role)
    return f"_INBOX.{names.prefix}.{role}"


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return role


@dataclass
class Grant:
    """What one identity may publish and subscribe to."""

    publish: set[str] = field(default_factory=set)
    subscribe: set[str] = field(default_factory=set)
    responses: bool = False  # may reply to requests it received

    def add(self, other: Grant) -> Grant:
        self.publish |= other.publish
        self.subscribe |= other.subscribe
        self.responses = self.responses or other.responses
        return self

    def to_server(self) -> dict[str, object]:
        """The ``permissions`` map of a user in nats-server's config."""
        # An empty allow list means "no restriction" to nats-server: nothing is denied explicitly.
        out: dict[str, object] = {
            "publish": {"allow": sorted(self.publish)} if self.publish else {"deny": [">"]},
            "subscribe": {"allow": sorted(self.subscribe)} if self.subscribe else {"deny": [">"]},
        }
        if self.responses:
            out["allow_responses"] = {"max": _STREAM_REPLY_MAX, "expires": _RESPONSE_EXPIRES}
        return out


# -- JetStream building blocks --------------------------------------------------------------
_API: Final = "$JS.API"


def stream(name: str, *, manage: bool = False, read: bool = False, purge: bool = False, delete: bool = False) -> Grant:
    """Rights on one stream (a key/value bucket is ``KV_<bucket>``, an object store ``OBJ_<bucket>``)."""
    pub = {f"{_API}.STREAM.INFO.{name}"}
    if manage:
        pub |= {f"{_API}.STREAM.CREATE.{name}", f"{_API}.STREAM.UPDATE.{name}"}
    if read:
        pub |= {
            f"{_API}.STREAM.MSG.GET.{name}",
            f"{_API}.DIRECT.GET.{name}",
            f"{_API}.DIRECT.GET.{name}.>",
            f"{_API}.CONSUMER.CREATE.{name}",
            f"{_API}.CONSUMER.CREATE.{name}.>",
            f"{_API}.CONSUMER.DURABLE.CREATE.{name}.*",
            f"{_API}.CONSUMER.INFO.{name}.*",
            f"{_API}.CONSUMER.LIST.{name}",
            f"{_API}.CONSUMER.NAMES.{name}",
            f"{_API}.CONSUMER.DELETE.{name}.*",
            f"{_API}.CONSUMER.MSG.NEXT.{name}.*",
            f"$JS.ACK.{name}.>",
            f"$JS.FC.{name}.>",
        }
    if purge:
        pub.add(f"{_API}.STREAM.PURGE.{name}")
    if delete:
        pub.add(f"{_API}.STREAM.DELETE.{name}")
    return Grant(publish=pub)


def queue_depth(name: str) -> Grant:
    """A stream's and its consumers' counts (the autoscaler's queue lag), none of its messages."""
    grant = stream(name)
    grant.publish |= {
        f"{_API}.CONSUMER.INFO.{name}.*",
        f"{_API}.CONSUMER.LIST.{name}",
        f"{_API}.CONSUMER.NAMES.{name}",
    }
    return grant


def kv(bucket: str, *, write: Iterable[str] = (), manage: bool = False, read: bool = True) -> Grant:
    """A key/value bucket: read it, and write the key patterns in ``write`` (``">"``: any key)."""
    grant = stream(f"KV_{bucket}", manage=manage, read=read)
    grant.publish |= {f"$KV.{bucket}.{pattern}" for pattern in write}
    return grant


def objects(bucket: str, *, write: bool = False, manage: bool = False) -> Grant:
    """An object store: read its objects; ``write`` puts and replaces them (old chunks purged).
    nats-py finds the stream of an object's chunks by subject (stream names only, no contents)."""
    grant = stream(f"OBJ_{bucket}", manage=manage, read=True, purge=write)
    grant.publish.add(f"{_API}.STREAM.NAMES")
    if write:
        grant.publish.add(f"$O.{bucket}.>")
    return grant


def service_base(names: Names, role: str) -> Grant:
    """What every mesh service does: discovery, its status endpoint, snapshots and spans."""
    micro = names.micro_name(role)
    return Grant(
        publish={names.metrics(role, "*"), names.spans(role)},
        subscribe={
            f"{MICRO_PREFIX}.*",
            f"{MICRO_PREFIX}.*.{micro}",
            f"{MICRO_PREFIX}.*.{micro}.*",
            names.service_status(role),
        },
        responses=True,
    )


def role_grant(names: Names, role: str) -> Grant:
    """The complete permissions of ``role`` in the mesh named by ``names``."""
    check_role(role)
    n = names
    grant = Grant(subscribe={f"{inbox_prefix(n, role)}.>"})
    if role in SERVICE_ROLES:
        grant.add(service_base(n, role))
    dlq = stream(n.dead_letter_stream, manage=True)
    dlq.publish.add(n.dead_letter("*"))
    if role == "ingest":
        grant.add(Grant(publish={n.ingest_events("*"), n.ingest_jobs, n.data_stream_subjects}))
        grant.subscribe.add(n.ingest_submit)
        grant.add(stream(n.ingest_jobs_stream, manage=True, read=True))
        grant.add(stream(n.data_stream, manage=True, read=True, purge=True))
        grant.add(kv(n.ingest_bucket, write=[">"], manage=True))
        grant.add(kv(n.datasets_bucket, write=[">"], manage=True))
        grant.add(objects(n.uploads_bucket, manage=True))
        grant.add(dlq)
    elif role == "trainer":
        grant.subscribe.add(n.train_submit)
        grant.add(kv(n.jobs_bucket, write=[">"], manage=True))
        grant.add(kv(n.trainers_bucket, write=[">"], manage=True))
        grant.add(kv(n.registry_bucket, write=[">"], manage=True))
        grant.add(objects(n.artifacts_bucket, write=True, manage=True))
        grant.add(stream(n.data_stream, read=True))
        grant.add(kv(n.datasets_bucket))
    elif role == "inference":
        grant.subscribe |= {
            n.infer("*", "*"),
            n.infer_direct_subjects,
            n.generate("*", "*"),
            n.generate_cancel_subjects,
            n.deploy,
        }
        grant.publish.add(n.result_subjects)
        grant.add(stream(n.requests_stream, manage=True, read=True))
        grant.add(stream(n.results_stream, manage=True, read=True))
        grant.add(kv(n.deployments_bucket, write=[">"], manage=True))
        grant.add(kv(n.registry_bucket, manage=True))
        grant.add(objects(n.artifacts_bucket))
        grant.add(dlq)
    elif role == "router":
        grant.subscribe.add(n.infer_routed_subjects)
        grant.publish |= {
            n.infer("*", "*"),
            n.infer_direct_subjects,
            n.generate("*", "*"),
            n.generate_cancel_subjects,
            n.durable_subjects,
            n.result_subjects,
            n.exposures("*"),
            n.feedback_subjects,
        }
        grant.add(stream(n.requests_stream, manage=True))
        grant.add(stream(n.results_stream, manage=True, read=True))
        grant.add(stream(n.events_stream, manage=True))
        grant.add(kv(n.deployments_bucket, manage=True))
        grant.add(kv(n.experiments_bucket, manage=True))
        grant.add(kv(n.registry_bucket, manage=True))
    elif role == "metrics":
        grant.subscribe |= {n.metrics_subjects, n.spans_subjects, n.scale_subjects, n.experiments_query}
        grant.publish |= {n.scale_subjects, n.experiment_events("*")}
        grant.add(stream(n.events_stream, manage=True, read=True))
        # Verdicts rewrite a split (compare-and-set); the autoscaling lease lives beside them.
        grant.add(kv(n.experiments_bucket, write=[split_keys(), lease_keys()], manage=True))
        grant.add(kv(n.jobs_bucket, manage=True))
        grant.add(queue_depth(n.requests_stream))  # lag, not the requests themselves
    elif role == "supervisor":
        grant.subscribe.add(n.scale_subjects)
    elif role == "operator":
        grant.add(_operator(n))
    return grant


def _operator(n: Names) -> Grant:
    """The CLI: asks every service, changes deployments, splits and aliases, reads everything,
    and may delete the mesh's streams.  It serves nothing (no response grant)."""
    grant = Grant(publish={f"{n.prefix}.>", f"{MICRO_PREFIX}.>"})
    for name in (
        n.data_stream,
        n.ingest_jobs_stream,
        n.requests_stream,
        n.results_stream,
        n.events_stream,
        n.dead_letter_stream,
    ):
        grant.add(stream(name, manage=True, read=True, purge=True, delete=True))
    for bucket in (
        n.datasets_bucket,
        n.ingest_bucket,
        n.trainers_bucket,
        n.jobs_bucket,
        n.registry_bucket,
        n.deployments_bucket,
        n.experiments_bucket,
    ):
        grant.add(kv(bucket, write=[">"], manage=True))
        grant.add(stream(f"KV_{bucket}", purge=True, delete=True))
    for bucket in (n.artifacts_bucket, n.uploads_bucket):
        grant.add(objects(bucket, write=True, manage=True))
        grant.add(stream(f"OBJ_{bucket}", delete=True))
    return grant


# -- credentials on disk --------------------------------------------------------------------
def new_seed() -> bytes:
    """A fresh user nkey seed (``SU…``)."""
    import nkeys

    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key(seed: bytes) -> str:
    import nkeys

    key: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return key.decode()


def seed_path(directory: Path, role: str) -> Path:
    return directory / f"{check_role(role)}{SEED_SUFFIX}"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (created 0600, never world-readable
    even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_seeds(directory: Path, roles: Iterable[str] = ROLES, *, rotate: Iterable[str] = ()) -> dict[str, str]:
    """Create the seed file of each role that has none (or is named in ``rotate``); returns
    role → public key.  The directory is made 0700."""
    rotate = set(rotate)
    keys: dict[str, str] = {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        for role in roles:
            path = seed_path(directory, role)
            if role in rotate or not path.is_file():
                write_private(path, new_seed())
            keys[role] = public_key(read_seed(path))
    except OSError as exc:
        raise ConfigError(f"cannot keep the identities in {directory}: {exc.strerror or exc}") from None
    return keys


def read_seed(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the nkey seed {path}: {exc.strerror}") from None
    if not data.startswith(b"SU"):
        raise ConfigError(f"{path} is not a NATS user nkey seed (it must start with 'SU')")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others: chmod 600 {path}")
    return data


def authorization_block(names: Names, keys: dict[str, str]) -> dict[str, object]:
    """nats-server's ``authorization`` map: one nkey user per role with its permissions."""
    users = [{"nkey": keys[role], "permissions": role_grant(names, role).to_server()} for role in ROLES if role in keys]
    return {"users": users}


def server_config(names: Names, keys: dict[str, str]) -> str:
    """nats-server config with the mesh's users: a file of its own (``-c``) or a fragment to
    ``include`` in a server's config (JSON values are valid nats-server config)."""
    block = json.dumps(authorization_block(names, keys), indent=2)
    header = f"# aimesh identities for mesh {names.prefix!r}: written by aimesh; regenerate rather than edit"
    return f"{header}\nauthorization: {block}\n"
