"""``aimesh up``: an embedded NATS and every service, supervised, until Ctrl-C.  ``aimesh demo``
starts the same mesh (:func:`supervise`) with the demo running beside it."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from aimesh.commands.mesh import EXIT_FAILED, Subparsers, add_mesh_flags, mesh_env
from services import SERVICE_NAMES
from shared.config import config_path, load_autoscale_config, load_mesh_config, load_up_config, read_toml
from shared.names import Names


def add_up_flags(p: argparse.ArgumentParser) -> None:
    add_mesh_flags(p)
    p.add_argument("--data-dir", help="where NATS keeps its store and the mesh its state (default: .aimesh)")
    p.add_argument("--port", type=int, help="the embedded nats-server's port (default 4222; 0 = a free one)")
    p.add_argument("--http-port", type=int, help="its monitoring port (default 8222; 0 = a free one)")
    for name in SERVICE_NAMES:
        p.add_argument(f"--{name}", type=int, metavar="N", help=f"instances of {name}")
    p.add_argument("--log-format", choices=["text", "json"], help="service log format")
    p.add_argument(
        "--credentials",
        metavar="DIR",
        help="the <role>.nk seeds `aimesh auth init` wrote (each service gets its role's): with --nats-url, "
        "or with --cluster (the same folder, cluster.secret included, on every host)",
    )
    p.add_argument("--host", help="the embedded nats-server's listen address (default 127.0.0.1)")
    p.add_argument(
        "--tls",
        action="store_const",
        const=True,
        help="TLS on the bus and the gateway (a local CA in the data dir)",
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="accept listening beyond loopback without authentication and TLS",
    )
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const=False,
        help="run the embedded NATS open to any local process (debugging only; default: one identity per role)",
    )
    p.add_argument("--cluster", metavar="NAME", help="join the embedded nats-server to NATS cluster NAME")
    p.add_argument(
        "--routes",
        metavar="HOST:PORT,...",
        type=_routes,
        help="with --cluster: every server's route address (the same list on each host)",
    )
    p.add_argument("--cluster-port", type=int, help="with --cluster: the port routes come in on (default 6222)")
    p.add_argument("--server-name", help="with --cluster: this server's unique name (default <hostname>-<host>-<port>)")
    add_cluster_tls_flags(p)
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="let the metrics service scale the inference workers (policy: [autoscale] / AIMESH_AUTOSCALE_*)",
    )


def add_cluster_tls_flags(p: argparse.ArgumentParser) -> None:
    tls = p.add_mutually_exclusive_group()
    tls.add_argument(
        "--cluster-tls",
        action="store_const",
        const=True,
        help="with --cluster: require TLS on the routes (default: on when the credentials hold the cluster CA)",
    )
    tls.add_argument("--no-cluster-tls", dest="cluster_tls", action="store_const", const=False, help="plain routes")
    for name, what in (("cert", "this server's route certificate"), ("key", "its key"), ("ca", "the routes' CA")):
        p.add_argument(f"--cluster-tls-{name}", metavar="FILE", help=f"with --cluster, your own PKI: {what} (PEM)")


def _routes(value: str) -> list[str]:
    return [r.strip() for r in value.split(",") if r.strip()]


def add_parser(subparsers: Subparsers) -> None:
    add_up_flags(subparsers.add_parser("up", help="start an embedded NATS and every service, supervised, until Ctrl-C"))


def run(args: argparse.Namespace) -> int:
    return supervise(args, demo=False)


def mesh_toml_table() -> dict[str, object]:
    table = read_toml(config_path()).get("mesh", {})
    return table if isinstance(table, dict) else {}


def supervise(args: argparse.Namespace, *, demo: bool) -> int:
    """Run the supervisor until a signal (or, with ``demo`` and ``--exit``, the demo's end)."""
    import signal

    import uvloop

    from aimesh.supervisor import Supervisor
    from shared.logs import setup_logging

    flags = (
        *("data_dir", "port", "http_port", "auth", "credentials", "host", "tls", "insecure"),
        *("cluster", "routes", "cluster_port", "server_name", *SERVICE_NAMES),
        *("cluster_tls", "cluster_tls_cert", "cluster_tls_key", "cluster_tls_ca"),
    )
    overrides = {k: getattr(args, k) for k in flags}
    up = load_up_config(overrides=overrides)
    child_env = mesh_env(args)
    if args.log_format:
        child_env["AIMESH_LOG_FORMAT"] = args.log_format
    if args.autoscale:
        child_env["AIMESH_AUTOSCALE_ENABLED"] = "true"
    mesh = load_mesh_config(overrides={"prefix": args.prefix})
    nats_url = args.nats_url or os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL")
    setup_logging("up", "supervisor", fmt=args.log_format or mesh.log_format, level=mesh.log_level)
    child_env.setdefault("AIMESH_PREFIX", mesh.prefix)
    table = mesh_toml_table()
    if "AIMESH_TRACE_SAMPLE_RATIO" not in os.environ and "trace_sample_ratio" not in table:
        child_env["AIMESH_TRACE_SAMPLE_RATIO"] = "1.0"  # a laptop mesh shows every trace
    if "AIMESH_HEALTH_PORT" not in os.environ and "health_port" not in table:
        child_env["AIMESH_HEALTH_PORT"] = "0"  # each instance probes on a free port (aimesh status shows it)

    async def supervised() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        supervisor = Supervisor(
            up,
            nats_url=nats_url,
            child_env=child_env,
            drain_timeout_s=mesh.drain_timeout_s,
            credentials_dir=Path(up.credentials) if up.credentials else None,
            autoscale=load_autoscale_config(env=os.environ | child_env),
        )
        if not demo:
            return await supervisor.run(stop)
        from aimesh.demo import run_demo

        demo_task = asyncio.create_task(run_demo(supervisor, Names(mesh.prefix), stop, exit_when_done=args.exit))
        code = await supervisor.run(stop)
        if not demo_task.done():
            demo_task.cancel()
        demo_code = await asyncio.gather(demo_task, return_exceptions=True)
        return code or (demo_code[0] if isinstance(demo_code[0], int) else EXIT_FAILED)

    return uvloop.run(supervised())
