"""``aimesh split``: a model's traffic across versions, optionally mirrored, optionally an
experiment the metrics service judges."""

from __future__ import annotations

import argparse

from aimesh.commands.mesh import EXIT_OK, Mesh, Subparsers, add_client_flags, run_on_mesh
from shared.schemas import Guardrails, Split


def add_parser(subparsers: Subparsers) -> None:
    split = subparsers.add_parser(
        "split", help="split a model's traffic: aimesh split MODEL 1=90 2=10 [--sticky HEADER]"
    )
    split.add_argument("model")
    split.add_argument("variants", nargs="*", help="VERSION=WEIGHT ... (none with --clear)")
    split.add_argument("--sticky", metavar="HEADER", help="pin callers to a variant by this header's value")
    split.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="VERSION=PERCENT",
        help="copy PERCENT%% of requests to VERSION, replies discarded",
    )
    split.add_argument("--clear", action="store_true", help="remove the split (back to the deployed version)")
    guard = split.add_argument_group(
        "experiment", "with any of these the split is an experiment the metrics service judges and acts on"
    )
    guard.add_argument("--control", metavar="VERSION", help="the baseline variant (default: the first)")
    guard.add_argument("--max-error-rate", type=float, help="roll a candidate back above this error share")
    guard.add_argument("--max-p99-ms", type=float, help="roll a candidate back above this p99 latency")
    guard.add_argument("--min-lift", type=float, help="promote only with at least this reward lift (absolute)")
    guard.add_argument("--min-samples", type=int, help="rewards per variant before a verdict (default 200)")
    guard.add_argument("--alpha", type=float, help="the sequential test's error bound (default 0.05)")
    guard.add_argument("--report-only", action="store_true", help="judge, but never change the split")
    add_client_flags(split)


def run(args: argparse.Namespace) -> int:
    guardrails = guardrails_from(args)

    async def step(mesh: Mesh) -> int:
        from shared.experiments import delete_split, put_split
        from shared.schemas import Mirror
        from shared.splits import parse_variants

        if args.clear:
            await delete_split(mesh.js, mesh.names, args.model)
            print(f"{args.model}: split removed; requests go to the deployed version")
            return EXIT_OK
        mirrors = [Mirror(version=v.version, percent=v.weight) for v in parse_variants(args.mirror)]
        wanted = Split(
            model=args.model,
            variants=parse_variants(args.variants),
            sticky=args.sticky,
            mirrors=mirrors,
            control=(args.control or "").lstrip("v"),
            guardrails=guardrails,
        )
        stored = await put_split(mesh.js, mesh.names, wanted)
        mesh.emit(stored, split_text(args.model, stored))
        return EXIT_OK

    return run_on_mesh(args, step)


def guardrails_from(args: argparse.Namespace) -> Guardrails | None:
    """The experiment's rules from the flags; None (a plain split) when no flag asks for one."""
    given = {
        "max_error_rate": args.max_error_rate,
        "max_p99_ms": args.max_p99_ms,
        "min_reward_lift": args.min_lift,
        "min_samples": args.min_samples,
        "alpha": args.alpha,
    }
    chosen = {k: v for k, v in given.items() if v is not None}
    if not chosen and not args.report_only and not args.control:
        return None
    return Guardrails(**chosen, auto=not args.report_only)


def split_text(model: str, stored: Split) -> str:
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
    return f"{model}: {shares}{extra}"
