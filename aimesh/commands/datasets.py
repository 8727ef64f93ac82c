"""``aimesh datasets``: the datasets bucket's manifests, all of them or one version."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from aimesh.commands.mesh import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Mesh,
    Step,
    Subparsers,
    add_client_flags,
    always_failed,
    run_on_mesh,
)

if TYPE_CHECKING:
    from shared.schemas import DatasetManifest


def add_parser(subparsers: Subparsers) -> None:
    datasets = subparsers.add_parser("datasets", help="list datasets, or `datasets show NAME[@VERSION]`")
    datasets.add_argument("action", nargs="?", choices=["show"], help="show one dataset version")
    datasets.add_argument("ref", nargs="?", help="NAME[@VERSION] (default version: latest)")
    add_client_flags(datasets)


def run(args: argparse.Namespace) -> int:
    if args.action == "show" and not args.ref:
        print("aimesh datasets show: give NAME[@VERSION]", file=sys.stderr)
        return EXIT_USAGE
    step = show_step(args.ref) if args.action else list_datasets
    return run_on_mesh(args, step, failed=always_failed)  # a missing dataset is 1, not a refusal


async def list_datasets(mesh: Mesh) -> int:
    from shared.datasets import list_manifests

    manifests = await list_manifests(mesh.js, mesh.names)
    if manifests or mesh.as_json:
        mesh.emit(manifests, datasets_table(manifests))
    else:
        print("no datasets yet")
    return EXIT_OK


def datasets_table(manifests: list[DatasetManifest]) -> str:
    lines = [f"{'DATASET':<24} {'FORMAT':<6} {'RECORDS':>10} {'SHARDS':>6} {'REJECTED':>8}  CREATED"]
    for m in manifests:
        lines.append(
            f"{m.dataset + '@' + m.version:<24} {m.format:<6} {m.records:>10,} {len(m.shards):>6} "
            f"{m.rejected:>8,}  {m.created_at}"
        )
    return "\n".join(lines)


def show_step(ref: str) -> Step:
    async def step(mesh: Mesh) -> int:
        from nats.js.errors import KeyNotFoundError

        from aimesh.progress import manifest_text
        from shared.datasets import get_manifest, parse_ref

        dataset, version = parse_ref(ref)
        try:
            manifest = await get_manifest(mesh.js, mesh.names, dataset, version)
        except KeyNotFoundError as exc:  # a bucket entry gone between the lookups
            print(f"aimesh datasets: {exc}", file=sys.stderr)
            return EXIT_FAILED
        mesh.emit(manifest, manifest_text(manifest))
        return EXIT_OK

    return step
