"""The ``aimesh`` command.

Exit codes: 0 success; 1 the command ran and failed (or found nothing); 2 bad usage or
configuration; 3 NATS could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import runpy
import sys
from collections.abc import Sequence

from services import SERVICE_NAMES
from shared.config import config_path, load_mesh_config, load_up_config, read_toml
from shared.errors import ConfigError, MeshError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", help="an existing NATS (default: $AIMESH_NATS_URL, $NATS_URL, or the local mesh)")
    p.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimesh", description="A mesh of PyTorch services over NATS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start an embedded NATS and every service, supervised, until Ctrl-C")
    _add_mesh_flags(up)
    up.add_argument("--data-dir", help="where NATS keeps its store and the mesh its state (default: .aimesh)")
    up.add_argument("--port", type=int, help="the embedded nats-server's port (default 4222; 0 = a free one)")
    up.add_argument("--http-port", type=int, help="its monitoring port (default 8222; 0 = a free one)")
    for name in SERVICE_NAMES:
        up.add_argument(f"--{name}", type=int, metavar="N", help=f"instances of {name}")
    up.add_argument("--log-format", choices=["text", "json"], help="service log format")

    run = sub.add_parser("run", help="run one service in the foreground (what a container runs)")
    run.add_argument("service", choices=SERVICE_NAMES)
    _add_mesh_flags(run)

    status = sub.add_parser("status", help="list live service instances (NATS micro protocol)")
    _add_mesh_flags(status)
    status.add_argument("--data-dir", default=None, help="find the local mesh's NATS here (default: .aimesh)")
    status.add_argument("--service", choices=SERVICE_NAMES, help="only this service")
    status.add_argument("--wait", type=float, default=0.5, help="seconds to gather replies (default 0.5)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = {"up": cmd_up, "run": cmd_run, "status": cmd_status}[args.command](args)
    except ConfigError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except MeshError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _mesh_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.prefix:
        env["AIMESH_PREFIX"] = args.prefix
    if args.nats_url:
        env["AIMESH_NATS_URL"] = args.nats_url
    return env


# -- up -----------------------------------------------------------------------------------------
def mesh_toml_table() -> dict[str, object]:
    table = read_toml(config_path()).get("mesh", {})
    return table if isinstance(table, dict) else {}


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    import uvloop

    from aimesh.supervisor import Supervisor
    from shared.logs import setup_logging

    overrides = {k: getattr(args, k) for k in ("data_dir", "port", "http_port", *SERVICE_NAMES)}
    up = load_up_config(overrides=overrides)
    child_env = _mesh_env(args)
    if args.log_format:
        child_env["AIMESH_LOG_FORMAT"] = args.log_format
    mesh = load_mesh_config(overrides={k: v for k, v in (("prefix", args.prefix),)})
    nats_url = args.nats_url or os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL")
    setup_logging("up", "supervisor", fmt=args.log_format or mesh.log_format, level=mesh.log_level)
    child_env.setdefault("AIMESH_PREFIX", mesh.prefix)
    table = mesh_toml_table()
    if "AIMESH_TRACE_SAMPLE_RATIO" not in os.environ and "trace_sample_ratio" not in table:
        child_env["AIMESH_TRACE_SAMPLE_RATIO"] = "1.0"  # a laptop mesh shows every trace
    if "AIMESH_HEALTH_PORT" not in os.environ and "health_port" not in table:
        child_env["AIMESH_HEALTH_PORT"] = "0"  # each instance probes on a free port (aimesh status shows it)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        supervisor = Supervisor(up, nats_url=nats_url, child_env=child_env, drain_timeout_s=mesh.drain_timeout_s)
        return await supervisor.run(stop)

    return uvloop.run(run())


# -- run ----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    os.environ.update(_mesh_env(args))
    runpy.run_module(f"services.{args.service}", run_name="__main__")  # exits with the service
    return EXIT_OK


# -- status -------------------------------------------------------------------------------------
def _resolve_nats_url(args: argparse.Namespace) -> str:
    from aimesh.supervisor import read_state

    if args.nats_url:
        return str(args.nats_url)
    if os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL"):
        return load_mesh_config().nats_url
    state = read_state(args.data_dir or load_up_config().data_dir)
    if state and state.get("nats_url"):
        return str(state["nats_url"])
    return load_mesh_config().nats_url


def cmd_status(args: argparse.Namespace) -> int:
    from aimesh.status import gather_status, render_table

    url = _resolve_nats_url(args)
    prefix = args.prefix or load_mesh_config().prefix
    logging.basicConfig(level=logging.WARNING)
    try:
        rows = asyncio.run(gather_status(url, prefix, service=args.service, wait_s=args.wait))
    except OSError as exc:
        print(f"aimesh status: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows) if rows else f"no aimesh services answered on {url} (prefix {prefix})")
    return EXIT_OK if rows else EXIT_FAILED
