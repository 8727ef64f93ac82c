"""``aimesh models``: the registry's model versions, one of them, or pointing an alias at one."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from aimesh.commands.mesh import (
    EXIT_OK,
    EXIT_USAGE,
    Mesh,
    Step,
    Subparsers,
    add_client_flags,
    always_failed,
    run_on_mesh,
)
from shared.errors import MeshError

if TYPE_CHECKING:
    from shared.schemas import ModelVersion


def add_parser(subparsers: Subparsers) -> None:
    models = subparsers.add_parser(
        "models", help="list models; `models show NAME[@VERSION|@ALIAS]`; `models alias NAME@VERSION ALIAS`"
    )
    models.add_argument("action", nargs="?", choices=["show", "alias"])
    models.add_argument("ref", nargs="?")
    models.add_argument("alias", nargs="?", help="with `alias`: the alias to point at the version")
    add_client_flags(models)


def run(args: argparse.Namespace) -> int:
    # Past the usage checks every failure is 1: a lookup that found nothing, not a refused request.
    if args.action == "show" and not args.ref:
        print("aimesh models show: give NAME[@VERSION|@ALIAS]", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "alias":
        if not args.ref or "@" not in args.ref or not args.alias:
            print("aimesh models alias: give NAME@VERSION ALIAS", file=sys.stderr)
            return EXIT_USAGE
        step = alias_step(args.ref, args.alias)
        return run_on_mesh(args, step, label="models alias", errors=(MeshError, ValueError), failed=always_failed)
    step = show_step(args.ref) if args.action else list_models
    return run_on_mesh(args, step, failed=always_failed)


async def list_models(mesh: Mesh) -> int:
    from shared.registry import list_versions, registry_kv

    versions = await list_versions(await registry_kv(mesh.js, mesh.names))
    if versions or mesh.as_json:
        mesh.emit(versions, models_table(versions))
    else:
        print("no models yet")
    return EXIT_OK


def models_table(versions: list[ModelVersion]) -> str:
    lines = [f"{'MODEL':<24} {'TASK':<9} {'DATASET':<16} {'METRICS'}"]
    for v in versions:
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()) if k.startswith("eval_"))
        lines.append(f"{v.model + '@' + v.version:<24} {v.task:<9} {v.dataset:<16} {metrics}")
    return "\n".join(lines)


def show_step(ref: str) -> Step:
    async def step(mesh: Mesh) -> int:
        from aimesh.progress import version_text
        from shared.registry import aliases, get_version, registry_kv

        kv = await registry_kv(mesh.js, mesh.names)
        model, _, version_ref = ref.partition("@")
        version = await get_version(kv, model, version_ref or None)
        mesh.emit(version, version_text(version, await aliases(kv, model)))
        return EXIT_OK

    return step


def alias_step(ref: str, alias: str) -> Step:
    async def step(mesh: Mesh) -> int:
        from shared.registry import get_version, registry_kv, set_alias

        model, _, version = ref.partition("@")
        kv = await registry_kv(mesh.js, mesh.names)
        target = await get_version(kv, model, version)
        await set_alias(kv, model, alias, target.version)
        print(f"{model}@{alias} → version {target.version}")
        return EXIT_OK

    return step
