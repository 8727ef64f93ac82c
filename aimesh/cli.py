"""The ``aimesh`` command.

Exit codes: 0 success; 1 the command ran and failed (or found nothing); 2 bad usage, bad
configuration or a request the mesh refused as invalid; 3 NATS could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from services import SERVICE_NAMES
from shared.config import config_path, load_autoscale_config, load_mesh_config, load_up_config, read_toml
from shared.errors import ConfigError, MeshError
from shared.names import Header, Names
from shared.schemas import ColumnSpec, DeployRequest, Guardrails, IngestRequest, TrainRequest

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", help="an existing NATS (default: $AIMESH_NATS_URL, $NATS_URL, or the local mesh)")
    p.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")


def _add_client_flags(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    _add_mesh_flags(p)
    p.add_argument("--data-dir", default=None, help="find the local mesh's NATS here (default: .aimesh)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_up_flags(p: argparse.ArgumentParser) -> None:
    _add_mesh_flags(p)
    p.add_argument("--data-dir", help="where NATS keeps its store and the mesh its state (default: .aimesh)")
    p.add_argument("--port", type=int, help="the embedded nats-server's port (default 4222; 0 = a free one)")
    p.add_argument("--http-port", type=int, help="its monitoring port (default 8222; 0 = a free one)")
    for name in SERVICE_NAMES:
        p.add_argument(f"--{name}", type=int, metavar="N", help=f"instances of {name}")
    p.add_argument("--log-format", choices=["text", "json"], help="service log format")
    p.add_argument(
        "--credentials",
        metavar="DIR",
        help="with --nats-url: the <role>.nk seeds `aimesh auth init` wrote (each service gets its role's)",
    )
    p.add_argument("--host", help="the embedded nats-server's listen address (default 127.0.0.1)")
    p.add_argument(
        "--tls",
        action="store_const",
        const=True,
        help="TLS on the bus and the gateway (a local CA in the data dir)",
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="accept listening beyond loopback without authentication and TLS",
    )
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const=False,
        help="run the embedded NATS open to any local process (debugging only; default: one identity per role)",
    )
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="let the metrics service scale the inference workers (policy: [autoscale] / AIMESH_AUTOSCALE_*)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimesh", description="A mesh of PyTorch services over NATS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_up_flags(sub.add_parser("up", help="start an embedded NATS and every service, supervised, until Ctrl-C"))

    demo = sub.add_parser("demo", help="start the mesh like `up` and run the pipeline on built-in data")
    _add_up_flags(demo)
    demo.add_argument("--exit", action="store_true", help="stop everything and exit when the demo is done")

    run = sub.add_parser("run", help="run one service in the foreground (what a container runs)")
    run.add_argument("service", choices=SERVICE_NAMES)
    _add_mesh_flags(run)

    status = sub.add_parser("status", help="list live service instances (NATS micro protocol)")
    _add_client_flags(status)
    status.add_argument("--service", choices=SERVICE_NAMES, help="only this service")
    status.add_argument("--wait", type=float, default=0.5, help="seconds to gather replies (default 0.5)")

    ingest = sub.add_parser("ingest", help="ingest files into a sharded, versioned dataset")
    ingest.add_argument("paths", nargs="*", help="files or a folder, as the ingest service sees them")
    ingest.add_argument("--dataset", help="dataset name (letters, digits, - and _)")
    ingest.add_argument("--format", choices=["csv", "jsonl", "npy", "npz", "text"], help="default: from the extension")
    ingest.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    ingest.add_argument("--label", help="the label column (stored as y)")
    ingest.add_argument("--shard-by", help="shard by a hash of this column instead of round-robin")
    ingest.add_argument("--schema", help='column types, e.g. "a:float32,b:int64,name:str"')
    ingest.add_argument("--max-reject-ratio", type=float, default=0.01, help="abort above this share (default 0.01)")
    ingest.add_argument("--seq-len", type=int, default=128, help="text: tokens per sequence (default 128)")
    ingest.add_argument("--demo", action="store_true", help="ingest the built-in demo sets (digits, pytext)")
    ingest.add_argument(
        "--upload", action="store_true", help="send the local file through the mesh (the service need not see it)"
    )
    _add_client_flags(ingest)

    train = sub.add_parser("train", help="train a model on a dataset across trainer nodes")
    train.add_argument("--model", help="registry name of the result, e.g. digits")
    train.add_argument("--resume", metavar="JOB", help="run a failed job again from its last checkpoint")
    train.add_argument("--factory", help="package.module:function (default: by --arch)")
    train.add_argument("--arch", choices=["mlp", "cnn", "lm"], help="a built-in model; its sizes come from the dataset")
    train.add_argument("--kwargs", default="{}", help="the factory's keyword arguments as JSON")
    train.add_argument("--dataset", help="NAME[@VERSION]")
    train.add_argument("--nodes", type=int, default=1)
    train.add_argument("--min-nodes", type=int, help="re-form with at least this many nodes after a loss")
    train.add_argument("--parallel", choices=["dp", "pp"], default="dp")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=64, help="global batch size")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: epoch ends)")
    train.add_argument(
        "--checkpoint-interval",
        type=float,
        default=30.0,
        help="seconds at least between epoch-end checkpoints (the last epoch always checkpoints)",
    )
    train.add_argument("--max-restarts", type=int, default=3)
    train.add_argument("--microbatches", type=int, default=4, help="pp: micro-batches per step")
    train.add_argument("--max-steps", type=int, help="stop after this many steps")
    train.add_argument("--wait-nodes", type=float, default=60.0, help="seconds to wait for the nodes")
    _add_client_flags(train)

    models = sub.add_parser(
        "models", help="list models; `models show NAME[@VERSION|@ALIAS]`; `models alias NAME@VERSION ALIAS`"
    )
    models.add_argument("action", nargs="?", choices=["show", "alias"])
    models.add_argument("ref", nargs="?")
    models.add_argument("alias", nargs="?", help="with `alias`: the alias to point at the version")
    _add_client_flags(models)

    deploy = sub.add_parser("deploy", help="serve MODEL[@VERSION|@ALIAS] on the inference workers")
    deploy.add_argument("ref", help="MODEL[@VERSION|@ALIAS] (default alias: latest)")
    deploy.add_argument("--replicas", type=int, default=1)
    deploy.add_argument("--max-batch-size", type=int, default=32)
    deploy.add_argument("--max-wait-ms", type=float, default=2.0)
    _add_client_flags(deploy)

    split = sub.add_parser("split", help="split a model's traffic: aimesh split MODEL 1=90 2=10 [--sticky HEADER]")
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
    _add_client_flags(split)

    experiments = sub.add_parser("experiments", help="an experiment's statistics and verdict: experiments show MODEL")
    experiments.add_argument("action", choices=["show"])
    experiments.add_argument("model")
    _add_client_flags(experiments)

    feedback = sub.add_parser("feedback", help="record an outcome for a served request: feedback MODEL ID REWARD")
    feedback.add_argument("model")
    feedback.add_argument("id", help=f"the request id (the response's id / {Header.REQUEST_ID})")
    feedback.add_argument("reward", type=float, help="a reward, or 1 / 0 for a conversion")
    _add_client_flags(feedback, json_flag=False)

    auth = sub.add_parser(
        "auth", help="identities on the bus: `auth init DIR` for an external NATS, `auth permissions`"
    )
    auth_sub = auth.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = auth_sub.add_parser(
        "init", help="write a seed per role and the server's authorization block (nats-server.conf) into DIR"
    )
    init.add_argument("dir", help="where to write <role>.nk (0600) and nats-server.conf")
    init.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")
    init.add_argument("--rotate", action="append", default=[], metavar="ROLE", help="new seed for ROLE (repeatable)")
    perms = auth_sub.add_parser("permissions", help="print each role's publish/subscribe grants")
    perms.add_argument("--role", help="only this role")
    perms.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")
    perms.add_argument("--json", action="store_true", help="machine-readable output")

    datasets = sub.add_parser("datasets", help="list datasets, or `datasets show NAME[@VERSION]`")
    datasets.add_argument("action", nargs="?", choices=["show"], help="show one dataset version")
    datasets.add_argument("ref", nargs="?", help="NAME[@VERSION] (default version: latest)")
    _add_client_flags(datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {
        "up": cmd_up,
        "demo": cmd_up,
        "run": cmd_run,
        "status": cmd_status,
        "ingest": cmd_ingest,
        "datasets": cmd_datasets,
        "train": cmd_train,
        "models": cmd_models,
        "deploy": cmd_deploy,
        "split": cmd_split,
        "experiments": cmd_experiments,
        "feedback": cmd_feedback,
        "auth": cmd_auth,
    }
    try:
        code = commands[args.command](args)
    except ConfigError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except MeshError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _mesh_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.prefix:
        env["AIMESH_PREFIX"] = args.prefix
    if args.nats_url:
        env["AIMESH_NATS_URL"] = args.nats_url
    return env


# -- up / demo ----------------------------------------------------------------------------------
def mesh_toml_table() -> dict[str, object]:
    table = read_toml(config_path()).get("mesh", {})
    return table if isinstance(table, dict) else {}


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    import uvloop

    from aimesh.supervisor import Supervisor
    from shared.logs import setup_logging

    flags = ("data_dir", "port", "http_port", "auth", "credentials", "host", "tls", "insecure", *SERVICE_NAMES)
    overrides = {k: getattr(args, k) for k in flags}
    up = load_up_config(overrides=overrides)
    child_env = _mesh_env(args)
    if args.log_format:
        child_env["AIMESH_LOG_FORMAT"] = args.log_format
    if args.autoscale:
        child_env["AIMESH_AUTOSCALE_ENABLED"] = "true"
    mesh = load_mesh_config(overrides={"prefix": args.prefix})
    nats_url = args.nats_url or os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL")
    setup_logging("up", "supervisor", fmt=args.log_format or mesh.log_format, level=mesh.log_level)
    child_env.setdefault("AIMESH_PREFIX", mesh.prefix)
    table = mesh_toml_table()
    if "AIMESH_TRACE_SAMPLE_RATIO" not in os.environ and "trace_sample_ratio" not in table:
        child_env["AIMESH_TRACE_SAMPLE_RATIO"] = "1.0"  # a laptop mesh shows every trace
    if "AIMESH_HEALTH_PORT" not in os.environ and "health_port" not in table:
        child_env["AIMESH_HEALTH_PORT"] = "0"  # each instance probes on a free port (aimesh status shows it)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        supervisor = Supervisor(
            up,
            nats_url=nats_url,
            child_env=child_env,
            drain_timeout_s=mesh.drain_timeout_s,
            credentials_dir=Path(up.credentials) if up.credentials else None,
            autoscale=load_autoscale_config(env=os.environ | child_env),
        )
        if args.command != "demo":
            return await supervisor.run(stop)
        from aimesh.demo import run_demo

        demo = asyncio.create_task(run_demo(supervisor, Names(mesh.prefix), stop, exit_when_done=args.exit))
        code = await supervisor.run(stop)
        if not demo.done():
            demo.cancel()
        demo_code = await asyncio.gather(demo, return_exceptions=True)
        return code or (demo_code[0] if isinstance(demo_code[0], int) else EXIT_FAILED)

    return uvloop.run(run())


# -- run ----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    os.environ.update(_mesh_env(args))
    runpy.run_module(f"services.{args.service}", run_name="__main__")  # exits with the service
    return EXIT_OK


# -- clients ------------------------------------------------------------------------------------
def _resolve_nats_url(args: argparse.Namespace) -> str:
    """The NATS this command talks to.  The local mesh's state file also says where its operator
    identity is; it is used unless ``AIMESH_NATS_NKEY`` names another."""
    from aimesh.supervisor import read_state

    if args.prefix:
        os.environ["AIMESH_PREFIX"] = args.prefix  # the operator's reply inbox is named after it
    state = read_state(args.data_dir or load_up_config().data_dir)
    if state and state.get("credentials") and not os.environ.get("AIMESH_NATS_NKEY"):
        os.environ["AIMESH_NATS_NKEY"] = str(Path(str(state["credentials"])) / "operator.nk")
    if state and state.get("tls_ca") and not os.environ.get("AIMESH_NATS_TLS_CA"):
        os.environ["AIMESH_NATS_TLS_CA"] = str(state["tls_ca"])
    if args.nats_url:
        return str(args.nats_url)
    if os.environ.get("AIMESH_NATS_URL") or os.environ.get("NATS_URL"):
        return load_mesh_config().nats_url
    if state and state.get("nats_url"):
        return str(state["nats_url"])
    return load_mesh_config().nats_url


def _names(args: argparse.Namespace) -> Names:
    try:
        return Names(args.prefix or load_mesh_config().prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from aimesh.status import gather_status, render_table

    url = _resolve_nats_url(args)
    prefix = _names(args).prefix
    logging.basicConfig(level=logging.WARNING)
    try:
        rows = asyncio.run(gather_status(url, prefix, service=args.service, wait_s=args.wait))
    except OSError as exc:
        print(f"aimesh status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows) if rows else f"no aimesh services answered on {url} (prefix {prefix})")
    return EXIT_OK if rows else EXIT_FAILED


def parse_schema(text: str | None) -> list[ColumnSpec] | None:
    """``"a:float32,b:int64"`` → column specs."""
    if not text:
        return None
    specs = []
    for item in text.split(","):
        name, sep, dtype = item.strip().partition(":")
        if not sep or not name or not dtype:
            raise ConfigError(f"--schema: {item!r} is not NAME:DTYPE")
        specs.append(ColumnSpec(name=name, dtype=dtype))
    return specs


def cmd_ingest(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import cmd_ingest as ingest_one
    from aimesh.datasets_cmd import run
    from aimesh.demo import DEMO_SETS

    url, names = _resolve_nats_url(args), _names(args)
    if args.demo:
        codes = [run(ingest_one(url, names, req, args.json)) for req in DEMO_SETS]
        return max(codes)
    if not args.paths or not args.dataset:
        print("aimesh ingest: give PATH... and --dataset NAME (or --demo)", file=sys.stderr)
        return EXIT_USAGE
    upload = Path(args.paths[0]) if args.upload else None
    if upload is not None and (len(args.paths) != 1 or not upload.is_file()):
        print("aimesh ingest --upload: give one file (folders are read by the service only)", file=sys.stderr)
        return EXIT_USAGE
    req = IngestRequest(
        paths=[str(Path(p).resolve()) for p in args.paths],
        dataset=args.dataset,
        format=args.format,
        shards=args.shards,
        label=args.label,
        shard_by=args.shard_by,
        schema=parse_schema(args.schema),
        max_reject_ratio=args.max_reject_ratio,
        seq_len=args.seq_len,
    )
    return run(ingest_one(url, names, req, args.json, upload))


def cmd_datasets(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import cmd_datasets as datasets
    from aimesh.datasets_cmd import run

    if args.action == "show" and not args.ref:
        print("aimesh datasets show: give NAME[@VERSION]", file=sys.stderr)
        return EXIT_USAGE
    return run(datasets(_resolve_nats_url(args), _names(args), args.ref if args.action else None, args.json))


ARCHES = {"mlp": "zoo.classifier:mlp", "cnn": "zoo.classifier:cnn", "lm": "zoo.lm:causal_lm"}


def cmd_train(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.train_cmd import cmd_train as train

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs is not JSON: {exc}") from None
    url, names = _resolve_nats_url(args), _names(args)
    if args.resume:
        req = TrainRequest(model=args.model or "resumed", factory="-", dataset="-", resume=args.resume)
        return run(train(url, names, req, args.json))
    if not args.model or not args.dataset:
        raise ConfigError("give --model NAME and --dataset NAME[@VERSION] (or --resume JOB)")
    if not args.factory and not args.arch:
        raise ConfigError("give --factory package.module:function or --arch mlp|cnn|lm")
    if args.arch and not args.factory:
        kwargs = run_sizes(url, names, args.dataset, args.arch) | kwargs
    req = TrainRequest(
        model=args.model,
        factory=args.factory or ARCHES[args.arch],
        kwargs=kwargs,
        dataset=args.dataset,
        nodes=args.nodes,
        min_nodes=args.min_nodes,
        parallel=args.parallel,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        checkpoint_interval_s=args.checkpoint_interval,
        max_restarts=args.max_restarts,
        microbatches=args.microbatches,
        max_steps=args.max_steps,
        wait_nodes_s=args.wait_nodes,
    )
    return run(train(url, names, req, args.json))


def run_sizes(url: str, names: Names, dataset: str, arch: str) -> dict[str, object]:
    """A built-in model's sizes from the dataset's manifest."""
    from aimesh.datasets_cmd import connect_once
    from shared.datasets import get_manifest, parse_ref

    async def sizes() -> dict[str, object]:
        nc = await connect_once(url)
        try:
            manifest = await get_manifest(nc.jetstream(), names, *parse_ref(dataset))
        finally:
            await nc.close()
        return model_sizes(manifest, arch)

    return asyncio.run(sizes())


def model_sizes(manifest: object, arch: str) -> dict[str, object]:
    from shared.schemas import DatasetManifest

    assert isinstance(manifest, DatasetManifest)
    if arch == "lm":
        seq = manifest.tokenizer.seq_len if manifest.tokenizer else 128
        vocab = manifest.tokenizer.vocab_size if manifest.tokenizer else 257
        return {"vocab": vocab, "context": seq, "dim": 128, "layers": 4, "heads": 4}
    x = next((c for c in manifest.columns if c.name == "x"), None)
    if x is None:
        raise ConfigError(f"dataset {manifest.dataset} has no feature column x")
    inputs = 1
    for d in x.shape:
        inputs *= d
    classes = manifest.classes or len(manifest.label_classes)
    if not classes:
        raise ConfigError(f"dataset {manifest.dataset} has no class labels: give --factory and --kwargs")
    if arch == "cnn":
        return {"side": round(inputs**0.5), "classes": classes}
    return {"inputs": inputs, "classes": classes}


def cmd_models(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.train_cmd import cmd_models as models

    if args.action == "show" and not args.ref:
        print("aimesh models show: give NAME[@VERSION|@ALIAS]", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "alias":
        if not args.ref or "@" not in args.ref or not args.alias:
            print("aimesh models alias: give NAME@VERSION ALIAS", file=sys.stderr)
            return EXIT_USAGE
        from aimesh.train_cmd import cmd_alias

        return run(cmd_alias(_resolve_nats_url(args), _names(args), args.ref, args.alias))
    return run(models(_resolve_nats_url(args), _names(args), args.ref if args.action else None, args.json))


def cmd_deploy(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.serve_cmd import deploy

    model, _, ref = args.ref.partition("@")
    req = DeployRequest(
        model=model,
        ref=ref or "latest",
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    return run(deploy(_resolve_nats_url(args), _names(args), req, args.json))


def guardrails_from(args: argparse.Namespace) -> Guardrails | None:
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


def cmd_split(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.serve_cmd import split

    return run(
        split(
            _resolve_nats_url(args),
            _names(args),
            args.model,
            args.variants,
            args.sticky,
            args.mirror,
            clear=args.clear,
            as_json=args.json,
            control=args.control or "",
            guardrails=guardrails_from(args),
        )
    )


def cmd_experiments(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.experiments_cmd import show

    return run(show(_resolve_nats_url(args), _names(args), args.model, args.json))


def cmd_feedback(args: argparse.Namespace) -> int:
    from aimesh.datasets_cmd import run
    from aimesh.experiments_cmd import feedback

    return run(feedback(_resolve_nats_url(args), _names(args), args.model, args.id, args.reward))


# -- auth ---------------------------------------------------------------------------------------
def cmd_auth(args: argparse.Namespace) -> int:
    from shared import auth

    names = _names(args)
    if args.action == "permissions":
        roles = [auth.check_role(args.role)] if args.role else list(auth.ROLES)
        grants = {role: auth.role_grant(names, role).to_server() for role in roles}
        if args.json:
            print(json.dumps(grants, indent=2))
        else:
            for role, grant in grants.items():
                print(f"{role}:")
                for verb in ("publish", "subscribe"):
                    allow = grant[verb]
                    assert isinstance(allow, dict)
                    print(f"  {verb}: {', '.join(allow['allow'])}")
                print(f"  replies to requests: {'yes' if 'allow_responses' in grant else 'no'}")
        return EXIT_OK
    for role in args.rotate:
        auth.check_role(role)
    directory = Path(args.dir)
    keys = auth.ensure_seeds(directory, rotate=args.rotate)
    config = directory / "nats-server.conf"
    auth.write_private(config, auth.server_config(names, keys).encode())
    print(f"wrote {len(keys)} identities ({', '.join(keys)}) as {directory}/<role>.nk (0600)")
    print(f"wrote the server's authorization block to {config}: `include` it in every server's config")
    if args.rotate:
        print(f"rotated {', '.join(args.rotate)}: reload the servers (nats-server --signal reload), then restart")
        print("the processes of those roles with the new seeds")
    return EXIT_OK
