"""``aimesh run SERVICE``: one service in the foreground, as a container runs it."""

from __future__ import annotations

import argparse
import os
import runpy

from aimesh.commands.mesh import EXIT_OK, Subparsers, add_mesh_flags, mesh_env
from services import SERVICE_NAMES


def add_parser(subparsers: Subparsers) -> None:
    run_ = subparsers.add_parser("run", help="run one service in the foreground (what a container runs)")
    run_.add_argument("service", choices=SERVICE_NAMES)
    add_mesh_flags(run_)


def run(args: argparse.Namespace) -> int:
    os.environ.update(mesh_env(args))
    runpy.run_module(f"services.{args.service}", run_name="__main__")  # exits with the service
    return EXIT_OK
