"""``aimesh feedback MODEL ID REWARD``: an outcome for a served request, onto the events stream."""

from __future__ import annotations

import argparse

from aimesh.commands.mesh import EXIT_OK, Mesh, Subparsers, add_client_flags, run_on_mesh
from shared.names import Header


def add_parser(subparsers: Subparsers) -> None:
    feedback = subparsers.add_parser(
        "feedback", help="record an outcome for a served request: feedback MODEL ID REWARD"
    )
    feedback.add_argument("model")
    feedback.add_argument("id", help=f"the request id (the response's id / {Header.REQUEST_ID})")
    feedback.add_argument("reward", type=float, help="a reward, or 1 / 0 for a conversion")
    add_client_flags(feedback, json_flag=False)


def run(args: argparse.Namespace) -> int:
    async def step(mesh: Mesh) -> int:
        import time

        from shared import events
        from shared.schemas import Feedback

        fb = events.check_feedback(Feedback(id=args.id, model=args.model, reward=args.reward, ts=time.time()))
        await events.publish_feedback(mesh.js, mesh.names, fb)
        print(f"{args.model}: reward {args.reward:g} recorded for request {args.id}")
        return EXIT_OK

    return run_on_mesh(args, step)
