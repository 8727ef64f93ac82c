"""What every mesh-talking command shares: its flags, finding the mesh, the operator's connection,
and the mapping of failures to a message on stderr and an exit code.

Exit codes: 0 success; 1 the command ran and failed (or found nothing); 2 bad usage, bad
configuration or a request the mesh refused as invalid; 3 NATS could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from shared.config import load_mesh_config, load_up_config
from shared.errors import ConfigError, MeshError
from shared.names import Names

if TYPE_CHECKING:  # nats loads in the commands that connect, not for `aimesh --help`
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

# What ``add_parser`` gets: ``parser.add_subparsers()`` (argparse has no public name for it).
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", help="an existing NATS (default: $AIMESH_NATS_URL, $NATS_URL, or the local mesh)")
    p.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")


def add_client_flags(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    add_mesh_flags(p)
    p.add_argument("--data-dir", default=None, help="find the local mesh's NATS here (default: .aimesh)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def mesh_env(args: argparse.Namespace) -> dict[str, str]:
    """The mesh flags as the environment a child process reads them from."""
    env: dict[str, str] = {}
    if args.prefix:
        env["AIMESH_PREFIX"] = args.prefix
    if args.nats_url:
        env["AIMESH_NATS_URL"] = args.nats_url
    return env


def resolve_nats_url(args: argparse.Namespace) -> str:
    """The NATS this command talks to.  The local mesh's state file also says where its operator
    identity is; it is used unless ``AIMESH_NATS_NKEY`` names another."""
    from aimesh.supervisor import read_state

    if args.prefix:
        os.environ["AIMESH_PREFIX"] = args.prefix  # the operator's reply inbox is named after it
    state = read_state(args.data_dir or load_up_config().data_dir)
    if state and state.get("credentials") and not os.environ.get("AIMESH_NATS_NKEY"):
        os.environ["AIMESH_NATS_NKEY"] = str(Path(str(state["credentials"])) / "operator.nk")
    if state and state.get("tls_ca") and not os.environ.get("AIMESH_NATS_TLS_CA"):
        os.environ["AIMESH_NATS_TLS_CA"] = str(state["tls_ca"])
    if args.nats_url:
        return str(args.nats_url)
    if os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL"):
        return load_mesh_config().nats_url
    if state and state.get("nats_url"):
        return str(state["nats_url"])
    return load_mesh_config().nats_url


def mesh_names(args: argparse.Namespace) -> Names:
    try:
        return Names(args.prefix or load_mesh_config().prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def connect_once(
    url: str, timeout_s: float = 5.0, *, nkey: str | None = None, prefix: str | None = None
) -> NatsClient:
    """One connection for a command, as the operator (the seed in ``AIMESH_NATS_NKEY``): fails
    within ``timeout_s`` when NATS does not answer (nats-py keeps retrying a refused first
    connection, even with reconnects off), at once when it refuses the identity."""
    import nats

    from shared.connect import connect_options, connect_single

    config = load_mesh_config(overrides={"nats_url": url, "nats_nkey": nkey, "prefix": prefix})
    options = connect_options(config, f"{config.prefix}-cli", role="operator")
    options |= {"connect_timeout": 3, "allow_reconnect": False, "max_reconnect_attempts": 0}
    try:
        return await asyncio.wait_for(connect_single(options), timeout_s)
    except (nats.errors.NoServersError, TimeoutError, OSError) as exc:
        raise ConnectionError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from exc
    except nats.errors.Error as exc:
        hint = "" if config.nats_nkey else " (no identity given: set AIMESH_NATS_NKEY to the operator's seed file)"
        raise ConfigError(f"NATS at {url} refused this client: {exc}{hint}") from None


def exit_code(exc: BaseException) -> int:
    """2 for a request the mesh refused as invalid (4xx), 1 for any other failure."""
    return EXIT_USAGE if getattr(exc, "code", 500) < 500 else EXIT_FAILED


def always_failed(exc: BaseException) -> int:
    """For commands whose failures are all 1 (a lookup that found nothing)."""
    return EXIT_FAILED


@dataclass(frozen=True)
class Mesh:
    """What a command's step gets: the operator's connection, the mesh's names, and the output
    mode."""

    nc: NatsClient
    names: Names
    url: str
    as_json: bool

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    def emit(self, value: object, human: str) -> None:
        """Print ``value`` as JSON under ``--json``, else the human text."""
        import msgspec

        print(msgspec.json.encode(value).decode() if self.as_json else human)


Step = Callable[[Mesh], Awaitable[int]]


def run_on_mesh(
    args: argparse.Namespace,
    step: Step,
    *,
    label: str | None = None,
    errors: tuple[type[BaseException], ...] = (MeshError,),
    failed: Callable[[BaseException], int] = exit_code,
) -> int:
    """Connect as the operator, run ``step`` (which prints its result and returns the exit code),
    close; returns the exit code.

    One of ``errors`` raised by the step is printed as ``aimesh <label>: <error>`` (``label``
    defaults to the command's name) and becomes ``failed(error)``; NATS not answering is
    ``EXIT_UNREACHABLE``.  Anything else (a refused identity is a ``ConfigError``) goes on to
    :func:`aimesh.cli.main`, which maps ``ConfigError`` to 2 and other ``MeshError`` to 1.
    """
    url, names = resolve_nats_url(args), mesh_names(args)
    mesh_label = label or args.command

    async def connected() -> int:
        nc = await connect_once(url)
        try:
            return await step(Mesh(nc=nc, names=names, url=url, as_json=bool(getattr(args, "json", False))))
        except errors as exc:
            print(f"aimesh {mesh_label}: {exc}", file=sys.stderr)
            return failed(exc)
        finally:
            await nc.close()

    try:
        return asyncio.run(connected())
    except ConnectionError as exc:
        print(f"aimesh: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
