"""``aimesh train``: a training job across the trainer nodes, followed to its end; the result is
a model version in the registry."""

from __future__ import annotations

import argparse
import json
import sys

from aimesh.commands.mesh import EXIT_FAILED, EXIT_OK, Mesh, Step, Subparsers, add_client_flags, run_on_mesh
from shared.errors import ConfigError
from shared.schemas import DatasetManifest, TrainRequest

ARCHES = {"mlp": "zoo.classifier:mlp", "cnn": "zoo.classifier:cnn", "lm": "zoo.lm:causal_lm"}


def add_parser(subparsers: Subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model on a dataset across trainer nodes")
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
    add_client_flags(train)


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs is not JSON: {exc}") from None
    if args.resume:
        req = TrainRequest(model=args.model or "resumed", factory="-", dataset="-", resume=args.resume)
        return run_on_mesh(args, train_step(req))
    if not args.model or not args.dataset:
        raise ConfigError("give --model NAME and --dataset NAME[@VERSION] (or --resume JOB)")
    if not args.factory and not args.arch:
        raise ConfigError("give --factory package.module:function or --arch mlp|cnn|lm")
    if args.arch and not args.factory:
        sizes: dict[str, object] = {}
        # errors=(): a missing dataset or one without classes is main's to report (1, or 2 for
        # a ConfigError), as before the job is submitted.
        code = run_on_mesh(args, sizes_step(args.dataset, args.arch, sizes), errors=())
        if code != EXIT_OK:
            return code
        kwargs = sizes | kwargs
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
    return run_on_mesh(args, train_step(req))


def train_step(req: TrainRequest) -> Step:
    """Submit ``req`` and follow it; print the model version it made.  Exit 1 when it failed."""

    async def step(mesh: Mesh) -> int:
        import msgspec

        from aimesh.jobs import train
        from aimesh.progress import version_text
        from shared.registry import get_version, registry_kv

        job = await train(mesh.nc, mesh.names, req, show=not mesh.as_json and sys.stderr.isatty())
        version = None
        if job.state == "complete":
            version = await get_version(await registry_kv(mesh.js, mesh.names), job.request.model, job.model_version)
        if mesh.as_json:
            doc = {"job": msgspec.to_builtins(job), "model": msgspec.to_builtins(version) if version else None}
            print(msgspec.json.encode(doc).decode())
        elif version is not None:
            print(version_text(version))
        else:
            print(f"training {job.job_id} failed: {job.error}", file=sys.stderr)
        return EXIT_OK if version is not None else EXIT_FAILED

    return step


def sizes_step(dataset: str, arch: str, into: dict[str, object]) -> Step:
    """Put a built-in model's sizes, read from the dataset's manifest, into ``into``."""

    async def step(mesh: Mesh) -> int:
        from shared.datasets import get_manifest, parse_ref

        into.update(model_sizes(await get_manifest(mesh.js, mesh.names, *parse_ref(dataset)), arch))
        return EXIT_OK

    return step


def model_sizes(manifest: DatasetManifest, arch: str) -> dict[str, object]:
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
