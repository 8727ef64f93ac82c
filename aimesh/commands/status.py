"""``aimesh status``: every live instance of the mesh, found with the NATS micro protocol."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from aimesh.commands.mesh import EXIT_FAILED, EXIT_OK, Mesh, Subparsers, add_client_flags, run_on_mesh
from services import SERVICE_NAMES

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient


def add_parser(subparsers: Subparsers) -> None:
    status = subparsers.add_parser("status", help="list live service instances (NATS micro protocol)")
    add_client_flags(status)
    status.add_argument("--service", choices=SERVICE_NAMES, help="only this service")
    status.add_argument("--wait", type=float, default=0.5, help="seconds to gather replies (default 0.5)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)

    async def step(mesh: Mesh) -> int:
        prefix = mesh.names.prefix
        rows = await gather_status(mesh.nc, prefix, service=args.service, wait_s=args.wait)
        if mesh.as_json:
            print(json.dumps(rows, indent=2))  # indented, unlike the other commands' JSON
        else:
            print(render_table(rows) if rows else f"no aimesh services answered on {mesh.url} (prefix {prefix})")
        return EXIT_OK if rows else EXIT_FAILED  # 1: nothing answered

    # errors=(): a mesh error is main's to report (exit 1), as before this helper existed.
    return run_on_mesh(args, step, errors=())


async def gather_status(
    nc: NatsClient, prefix: str, *, service: str | None = None, wait_s: float = 0.5
) -> list[dict[str, Any]]:
    """One row per instance of mesh ``prefix``: identity, endpoints and their counters."""
    from shared.discovery import discover
    from shared.schemas import MicroInfo, MicroStats

    name = f"{prefix}-{service}" if service else None
    infos = await discover(nc, "INFO", MicroInfo, name=name, wait_s=wait_s)
    stats = {s.id: s for s in await discover(nc, "STATS", MicroStats, name=name, wait_s=wait_s)}
    rows = []
    for info in infos:
        if info.metadata.get("mesh") != prefix:
            continue  # another mesh on the same NATS
        st = stats.get(info.id)
        endpoints = st.endpoints if st else []
        requests = sum(e.num_requests for e in endpoints)
        total_ns = sum(e.processing_time for e in endpoints)
        rows.append(
            {
                "service": info.metadata.get("service", info.name),
                "name": info.name,
                "id": info.id,
                "version": info.version,
                "state": (st.metadata if st else info.metadata).get("state", "?"),
                "pid": info.metadata.get("pid"),
                "host": info.metadata.get("host"),
                "health": info.metadata.get("health"),
                "http": info.metadata.get("http"),
                "started": st.started if st else None,
                "requests": requests,
                "errors": sum(e.num_errors for e in endpoints),
                "average_processing_time_ms": round(total_ns / requests / 1e6, 3) if requests else 0.0,
                "endpoints": [
                    {
                        "name": e.name,
                        "subject": e.subject,
                        "queue_group": e.queue_group,
                        "requests": e.num_requests,
                        "errors": e.num_errors,
                        "average_processing_time_ms": round(e.average_processing_time / 1e6, 3),
                        "last_error": e.last_error,
                    }
                    for e in endpoints
                ],
            }
        )
    rows.sort(key=lambda r: (r["service"], r["id"]))
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    head = ("SERVICE", "ID", "VERSION", "STATE", "ENDPOINTS", "REQUESTS", "ERRORS", "AVG MS", "PID")
    body = [
        (
            r["service"],
            r["id"],
            r["version"],
            r["state"],
            ",".join(e["name"] for e in r["endpoints"]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['average_processing_time_ms']:.3f}",
            str(r["pid"]),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body)]
    return "\n".join(lines)
