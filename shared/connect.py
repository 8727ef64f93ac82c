"""Connecting to NATS the way every mesh process does: credentials and TLS from the config,
reconnect forever once connected, and keep retrying (with a capped back-off) until the first
connection succeeds, so a service started before its NATS server simply waits for it."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from shared.config import MeshConfig

log = logging.getLogger(__name__)


def connect_options(config: MeshConfig, name: str) -> dict[str, Any]:
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
    if config.nats_tls_ca or config.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            ctx.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
        options["tls"] = ctx
    return options


async def connect(config: MeshConfig, name: str, *, max_backoff_s: float = 5.0, **callbacks: Any) -> NatsClient:
    """Connect, retrying until it works (cancel the caller to give up)."""
    options = connect_options(config, name) | callbacks
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            return await nats.connect(**options)
        except (OSError, TimeoutError, nats.errors.NoServersError) as exc:
            if attempt == 1 or attempt % 10 == 0:
                log.warning("cannot reach NATS at %s (%s); retrying", config.nats_url, exc or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
