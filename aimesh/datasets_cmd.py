"""``aimesh ingest`` and ``aimesh datasets``: clients of the ingest service and the datasets bucket."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import ObjectMeta
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError, ObjectNotFoundError

from aimesh.progress import manifest_text, progress_line, rejects_text
from shared.client import request
from shared.config import load_mesh_config
from shared.connect import connect_options, connect_single
from shared.datasets import get_manifest, list_manifests, parse_ref
from shared.errors import ConfigError, MeshError, Unavailable
from shared.names import Names, ingest_job_key
from shared.registry import put_object
from shared.schemas import DatasetManifest, IngestAccepted, IngestJob, IngestRequest

_job = msgspec.json.Decoder(IngestJob)
QUEUED_NOTE_S = 15.0


def exit_code(exc: MeshError) -> int:
    """2 for a request the mesh refused as invalid (4xx), 1 for any other failure."""
    return 2 if getattr(exc, "code", 500) < 500 else 1


async def connect_once(
    url: str, timeout_s: float = 5.0, *, nkey: str | None = None, prefix: str | None = None
) -> NatsClient:
    """One connection for a command, as the operator (the seed in ``AIMESH_NATS_NKEY``): fails
    within ``timeout_s`` when NATS does not answer (nats-py keeps retrying a refused first
    connection, even with reconnects off), at once when it refuses the identity."""
    config = load_mesh_config(overrides={"nats_url": url, "nats_nkey": nkey, "prefix": prefix})
    options = connect_options(config, f"{config.prefix}-cli", role="operator")
    options |= {"connect_timeout": 3, "allow_reconnect": False, "max_reconnect_attempts": 0}
    try:
        return await asyncio.wait_for(connect_single(options), timeout_s)
    except (nats.errors.NoServersError, TimeoutError, OSError) as exc:
        raise ConnectionError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from exc
    except nats.errors.Error as exc:
        hint = "" if config.nats_nkey else " (no identity given: set AIMESH_NATS_NKEY to the operator's seed file)"
        raise ConfigError(f"NATS at {url} refused this client: {exc}{hint}") from None


async def ingest(
    nc: NatsClient, names: Names, req: IngestRequest, *, progress: bool = True, out: Any = sys.stderr
) -> tuple[IngestJob, DatasetManifest | None]:
    """Submit, follow the job to its end; returns the final job record and, if complete, the
    manifest."""
    accepted = await request(nc, names.ingest_submit, req, IngestAccepted, timeout_s=120)
    kv = await nc.jetstream().key_value(names.ingest_bucket)
    watcher = await kv.watch(ingest_job_key(accepted.job_id))
    job: IngestJob | None = None
    waited = 0.0
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                entry = None
            if entry is None or entry.value is None:
                waited += 1.0
                if job is not None and job.state == "queued" and waited >= QUEUED_NOTE_S and progress:
                    print(f"\n{job.job_id} is still queued: is an ingest service running?", file=out)
                    waited = -1e9  # say it once
                continue
            job = _job.decode(entry.value)
            waited = 0.0
            if progress:
                print("\r" + progress_line(job), end="", file=out, flush=True)
            if job.state in ("complete", "failed"):
                break
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    if progress:
        print(file=out)
    if job.state == "failed":
        return job, None
    return job, await get_manifest(nc.jetstream(), names, job.dataset, job.version)


async def upload(nc: NatsClient, names: Names, path: Path) -> str:
    """Put a local file into the uploads bucket for ``IngestRequest(object=...)``; returns its
    name, ``sha256-<hex of the content>`` (an upload already there is not sent again).  The file
    name goes in the object's description, for the service to tell the format by."""
    data = await asyncio.to_thread(path.read_bytes)
    name = f"sha256-{hashlib.sha256(data).hexdigest()}"
    try:
        store = await nc.jetstream().object_store(names.uploads_bucket)
    except (NotFoundError, BucketNotFoundError):
        raise Unavailable(f"no uploads bucket {names.uploads_bucket}: is an ingest service running?") from None
    try:
        info = await store.get_info(name)
        if info.size == len(data) and info.description == path.name:
            return name
    except ObjectNotFoundError:
        pass
    await put_object(store, name, data)
    await store.update_meta(name, ObjectMeta(name=name, description=path.name))
    return name


async def cmd_ingest(url: str, names: Names, req: IngestRequest, as_json: bool, upload_path: Path | None = None) -> int:
    """Submit ``req`` and follow it; with ``upload_path``, upload that file first and submit it
    by reference (``req.object``)."""
    nc = await connect_once(url)
    try:
        if upload_path is not None:
            req = msgspec.structs.replace(req, paths=[], object=await upload(nc, names, upload_path))
        job, manifest = await ingest(nc, names, req, progress=not as_json and sys.stderr.isatty())
    except MeshError as exc:
        print(f"aimesh ingest: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    if as_json:
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
    return 0 if manifest is not None else 1


async def cmd_datasets(url: str, names: Names, ref: str | None, as_json: bool) -> int:
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        if ref is None:
            manifests = await list_manifests(js, names)
            if as_json:
                print(msgspec.json.encode(manifests).decode())
            elif not manifests:
                print("no datasets yet")
            else:
                print(f"{'DATASET':<24} {'FORMAT':<6} {'RECORDS':>10} {'SHARDS':>6} {'REJECTED':>8}  CREATED")
                for m in manifests:
                    print(
                        f"{m.dataset + '@' + m.version:<24} {m.format:<6} {m.records:>10,} {len(m.shards):>6} "
                        f"{m.rejected:>8,}  {m.created_at}"
                    )
            return 0
        dataset, version = parse_ref(ref)
        try:
            manifest = await get_manifest(js, names, dataset, version)
        except (MeshError, KeyNotFoundError) as exc:
            print(f"aimesh datasets: {exc}", file=sys.stderr)
            return 1
        print(msgspec.json.encode(manifest).decode() if as_json else manifest_text(manifest))
        return 0
    except MeshError as exc:
        print(f"aimesh datasets: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


def run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except ConnectionError as exc:
        print(f"aimesh: {exc}", file=sys.stderr)
        return 3
