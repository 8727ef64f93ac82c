"""``aimesh ingest``: files (read by the service, or uploaded through the mesh) into a sharded,
versioned dataset, following the job to its end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aimesh.commands.mesh import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Mesh,
    Step,
    Subparsers,
    add_client_flags,
    run_on_mesh,
)
from shared.errors import ConfigError
from shared.schemas import ColumnSpec, IngestRequest


def add_parser(subparsers: Subparsers) -> None:
    ingest = subparsers.add_parser("ingest", help="ingest files into a sharded, versioned dataset")
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
    add_client_flags(ingest)


def run(args: argparse.Namespace) -> int:
    if args.demo:
        from aimesh.demo import DEMO_SETS

        return max(run_on_mesh(args, ingest_step(req)) for req in DEMO_SETS)
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
    return run_on_mesh(args, ingest_step(req, upload))


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


def ingest_step(req: IngestRequest, upload_path: Path | None = None) -> Step:
    """Submit ``req`` and follow it; with ``upload_path``, upload that file first and submit it
    by reference (``req.object``).  Exit 1 when the job failed."""

    async def step(mesh: Mesh) -> int:
        import msgspec

        from aimesh.jobs import ingest, upload
        from aimesh.progress import manifest_text, rejects_text

        request = req
        if upload_path is not None:
            request = msgspec.structs.replace(req, paths=[], object=await upload(mesh.nc, mesh.names, upload_path))
        job, manifest = await ingest(mesh.nc, mesh.names, request, progress=not mesh.as_json and sys.stderr.isatty())
        if mesh.as_json:
            doc = {"job": msgspec.to_builtins(job), "manifest": msgspec.to_builtins(manifest) if manifest else None}
            print(msgspec.json.encode(doc).decode())
        else:
            if manifest is not None:
                print(manifest_text(manifest))
            else:
                print(f"ingest {job.job_id} failed: {job.error}", file=sys.stderr)
            report = rejects_text(job)
            if report:
                print(report, file=sys.stderr)
        return EXIT_OK if manifest is not None else EXIT_FAILED

    return step
