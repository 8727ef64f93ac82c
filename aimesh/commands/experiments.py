"""``aimesh experiments show MODEL``: an experiment's statistics and verdict, from the metrics
service."""

from __future__ import annotations

import argparse

from aimesh.commands.mesh import EXIT_OK, Mesh, Subparsers, add_client_flags, run_on_mesh


def add_parser(subparsers: Subparsers) -> None:
    experiments = subparsers.add_parser(
        "experiments", help="an experiment's statistics and verdict: experiments show MODEL"
    )
    experiments.add_argument("action", choices=["show"])
    experiments.add_argument("model")
    add_client_flags(experiments)


def run(args: argparse.Namespace) -> int:
    async def step(mesh: Mesh) -> int:
        from aimesh.progress import render_report
        from shared.client import request
        from shared.schemas import ExperimentQuery, ExperimentReport

        query = ExperimentQuery(model=args.model)
        report = await request(mesh.nc, mesh.names.experiments_query, query, ExperimentReport)
        mesh.emit(report, render_report(report))
        return EXIT_OK

    return run_on_mesh(args, step)
