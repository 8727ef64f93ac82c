"""``aimesh deploy``: a client of the inference workers' deploy endpoint."""

from __future__ import annotations

import sys

import msgspec

from aimesh.datasets_cmd import connect_once, exit_code
from shared.client import request
from shared.errors import MeshError
from shared.names import Names
from shared.schemas import Deployment, DeployRequest, Guardrails


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
    control: str = "",
    guardrails: Guardrails | None = None,
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
            Split(
                model=model,
                variants=parse_variants(variants),
                sticky=sticky,
                mirrors=mirror_list,
                control=control.lstrip("v"),
                guardrails=guardrails,
            ),
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
        if stored.guardrails is not None:
            g = stored.guardrails
            rules = [f"control v{stored.control_version}", f"alpha {g.alpha:g}", f"min samples {g.min_samples}"]
            if g.max_error_rate is not None:
                rules.append(f"max error rate {g.max_error_rate:g}")
            if g.max_p99_ms is not None:
                rules.append(f"max p99 {g.max_p99_ms:g} ms")
            if g.min_reward_lift:
                rules.append(f"min lift {g.min_reward_lift:g}")
            rules.append("acts automatically" if g.auto else "report only")
            extra += f"; experiment {stored.experiment}: " + ", ".join(rules)
        print(f"{model}: {shares}{extra}")
    return 0
