"""``aimesh deploy``: a model version on the inference workers, through their deploy endpoint."""

from __future__ import annotations

import argparse

from aimesh.commands.mesh import EXIT_OK, Mesh, Step, Subparsers, add_client_flags, run_on_mesh
from shared.schemas import DeployRequest


def add_parser(subparsers: Subparsers) -> None:
    deploy = subparsers.add_parser("deploy", help="serve MODEL[@VERSION|@ALIAS] on the inference workers")
    deploy.add_argument("ref", help="MODEL[@VERSION|@ALIAS] (default alias: latest)")
    deploy.add_argument("--replicas", type=int, default=1)
    deploy.add_argument("--max-batch-size", type=int, default=32)
    deploy.add_argument("--max-wait-ms", type=float, default=2.0)
    add_client_flags(deploy)


def run(args: argparse.Namespace) -> int:
    model, _, ref = args.ref.partition("@")
    req = DeployRequest(
        model=model,
        ref=ref or "latest",
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    return run_on_mesh(args, deploy_step(req))


def deploy_step(req: DeployRequest) -> Step:
    async def step(mesh: Mesh) -> int:
        from shared.client import request
        from shared.schemas import Deployment

        deployment = await request(mesh.nc, mesh.names.deploy, req, Deployment, timeout_s=30)
        mesh.emit(
            deployment,
            f"deployed {deployment.model}@{deployment.version} (from {deployment.ref}); batches of up to "
            f"{deployment.max_batch_size}, waiting at most {deployment.max_wait_ms:g} ms under load; "
            f"served on {mesh.names.infer(deployment.model, deployment.version)}",
        )
        return EXIT_OK

    return step
