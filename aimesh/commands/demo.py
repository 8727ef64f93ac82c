"""``aimesh demo``: the mesh of ``aimesh up`` with the pipeline run on built-in data beside it."""

from __future__ import annotations

import argparse

from aimesh.commands.mesh import Subparsers
from aimesh.commands.up import add_up_flags, supervise


def add_parser(subparsers: Subparsers) -> None:
    demo = subparsers.add_parser("demo", help="start the mesh like `up` and run the pipeline on built-in data")
    add_up_flags(demo)
    demo.add_argument("--exit", action="store_true", help="stop everything and exit when the demo is done")


def run(args: argparse.Namespace) -> int:
    return supervise(args, demo=True)
