"""``aimesh deploy``: a client of the inference workers' deploy endpoint."""

from __future__ import annotations

import sys

import msgspec

from aimesh.datasets_cmd import connect_once, exit_code
from shared.client import request
from shared.errors import MeshError
from shared.names import Names
from shared.schemas import Deployment, DeployRequest


async def deploy(url: str, names: Names, req: DeployRequest, as_json: bool) -> int:
    nc = await connect_once(url)
    try:
        deployment = await request(nc, names.deploy, req, Deployment, timeout_s=30)
    except MeshError as exc:
        print(f"aimesh deploy: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    if as_json:
        print(msgspec.json.encode(deployment).decode())
    else:
        print(
            f"deployed {deployment.model}@{deployment.version} (from {deployment.ref}); batches of up to "
            f"{deployment.max_batch_size}, waiting at most {deployment.max_wait_ms:g} ms under load; "
            f"served on {names.infer(deployment.model, deployment.version)}"
        )
    return 0
