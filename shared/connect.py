"""Connecting to NATS the way every mesh process does: credentials and TLS from the config,
reconnect forever once connected, and keep retrying (with a capped back-off) until the first
connection succeeds, so a service started before its NATS server simply waits for it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from shared.auth import ROLES, inbox_prefix, read_seed
from shared.config import MeshConfig
from shared.errors import ConfigError
from shared.names import Names
from shared.tls import client_context

log = logging.getLogger(__name__)


def connect_options(config: MeshConfig, name: str, role: str | None = None) -> dict[str, Any]:
    """nats-py's options for a mesh process.  ``role`` (a service's name, ``supervisor`` or
    ``operator``) picks the reply-inbox prefix that role's identity may subscribe to."""
    options: dict[str, Any] = {
        "servers": [u.strip() for u in config.nats_url.split(",") if u.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # forever: a mesh process outlives NATS restarts
        "reconnect_time_wait": 1,
        "connect_timeout": config.connect_timeout_s,
        # Buffer publishes made while disconnected (8 MiB) instead of failing them at once.
        "pending_size": 8 * 1024 * 1024,
    }
    if config.nats_creds:
        options["user_credentials"] = config.nats_creds
    if config.nats_nkey:
        read_seed(Path(config.nats_nkey))  # fails now, with the reason, rather than as an auth error
        options["nkeys_seed"] = config.nats_nkey
    if role in ROLES:
        options["inbox_prefix"] = inbox_prefix(Names(config.prefix), role)
    if config.nats_tls_ca or config.nats_tls_cert:
        options["tls"] = client_context(config.nats_tls_ca, config.nats_tls_cert, config.nats_tls_key)
    return options


async def connect(
    config: MeshConfig, name: str, *, role: str | None = None, max_backoff_s: float = 5.0, **callbacks: Any
) -> NatsClient:
    """Connect, retrying until it works (cancel the caller to give up).  Refused credentials are
    not retried: no amount of waiting fixes them."""
    options = connect_options(config, name, role) | callbacks
    # nats-py retries a refused first connection forever when reconnects are on, whatever the
    # reason: each attempt here is a single one, and reconnecting is switched on once connected.
    reconnect = options.get("allow_reconnect", True)
    options["allow_reconnect"] = False
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            nc = await connect_single(options)
            nc.options["allow_reconnect"] = reconnect
            return nc
        except nats.errors.Error as exc:
            if _auth_refused(exc):
                raise ConfigError(f"NATS at {config.nats_url} refused this identity: {exc}") from None
            raise
        except (OSError, TimeoutError, nats.errors.NoServersError) as exc:
            if attempt == 1 or attempt % 10 == 0:
                log.warning("cannot reach NATS at %s (%s); retrying", config.nats_url, exc or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)


async def wait_sent(nc: NatsClient, timeout_s: int = 10) -> None:
    """Return once the server has processed everything this client sent so far (a subscription
    just made is registered: a request from anywhere now finds it).

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still queued
    for its writer task, so its PONG alone proves nothing about a SUB made just before: a caller
    could still get "no responders" (seen in 2-3% of starts).  The queue is written out first
    (``_flush_pending(force_flush=True)``, nats-py 2.16), then the round trip."""
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout_s)


async def connect_single(options: dict[str, Any]) -> NatsClient:
    """One connection attempt with ``options``; nothing left open when it fails."""
    nc = NatsClient()
    try:
        await nc.connect(**options)
    except BaseException:
        await nc.close()  # a failed connect() leaves its socket open
        raise
    return nc


def _auth_refused(exc: BaseException) -> bool:
    return "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower()
