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


async def split(
    url: str,
    names: Names,
    model: str,
    variants: list[str],
    sticky: str | None,
    mirrors: list[str],
    *,
    clear: bool,
    as_json: bool,
) -> int:
    from shared.experiments import delete_split, put_split
    from shared.schemas import Mirror, Split
    from shared.splits import parse_variants

    nc = await connect_once(url)
    try:
        if clear:
            await delete_split(nc.jetstream(), names, model)
            print(f"{model}: split removed; requests go to the deployed version")
            return 0
        mirror_list = [Mirror(version=v.version, percent=v.weight) for v in parse_variants(mirrors)]
        stored = await put_split(
            nc.jetstream(),
            names,
            Split(model=model, variants=parse_variants(variants), sticky=sticky, mirrors=mirror_list),
        )
    except MeshError as exc:
        print(f"aimesh split: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    if as_json:
        print(msgspec.json.encode(stored).decode())
    else:
        shares = ", ".join(f"v{v.version} {v.weight:g}" for v in stored.variants)
        extra = f"; sticky by {stored.sticky}" if stored.sticky else ""
        extra += "".join(f"; mirror {m.percent:g}% to v{m.version}" for m in stored.mirrors)
        print(f"{model}: {shares}{extra}")
    return 0
