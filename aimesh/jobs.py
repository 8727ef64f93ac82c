"""Submitting a job to the mesh and following it to its end: an ingest (with an optional upload
of a local file first) or a training run.  Used by the commands, the demo, the benchmarks and the
tests; printing progress is optional and goes to ``out``."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import ObjectMeta
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError, ObjectNotFoundError

from aimesh.progress import progress_line, train_progress_line
from shared.client import request
from shared.datasets import get_manifest
from shared.errors import Unavailable
from shared.names import Names, ingest_job_key, job_key, progress_key
from shared.registry import put_object
from shared.schemas import (
    DatasetManifest,
    IngestAccepted,
    IngestJob,
    IngestRequest,
    TrainAccepted,
    TrainJob,
    TrainProgress,
    TrainRequest,
)

_ingest_job = msgspec.json.Decoder(IngestJob)
_train_job = msgspec.json.Decoder(TrainJob)
_train_progress = msgspec.json.Decoder(TrainProgress)
QUEUED_NOTE_S = 15.0


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
            job = _ingest_job.decode(entry.value)
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


async def submit_training(
    nc: NatsClient, names: Names, req: TrainRequest, *, within_s: float = 60.0, pause_s: float = 2.0
) -> TrainAccepted:
    """Submit a training job, resending while the trainers answer 503 (a stream electing its
    leader) for up to ``within_s``.  Every send carries one submission id (``req``'s, or a new
    one), so a resend whose first try was stored after all answers that job instead of a second."""
    if not req.submission_id and not req.resume:
        req = msgspec.structs.replace(req, submission_id=secrets.token_hex(8))
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await request(nc, names.train_submit, req, TrainAccepted, timeout_s=60)
        except Unavailable:
            if time.monotonic() + pause_s > deadline:
                raise
            await asyncio.sleep(pause_s)


async def train(
    nc: NatsClient, names: Names, req: TrainRequest, *, show: bool = True, out: Any = sys.stderr
) -> TrainJob:
    """Submit and follow a training job to its end."""
    accepted = await submit_training(nc, names, req)
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    last_line = ""
    last_attempt = 0
    while True:
        job = _train_job.decode((await kv.get(job_key(accepted.job_id))).value or b"")
        try:
            progress: TrainProgress | None = _train_progress.decode(
                (await kv.get(progress_key(job.job_id))).value or b""
            )
        except KeyNotFoundError:
            progress = None
        if show:
            if job.attempt != last_attempt and job.attempt > 1:
                print(f"\n{job.job_id}: attempt {job.attempt - 1} failed: {job.error}; re-forming", file=out)
            last_attempt = job.attempt
            line = train_progress_line(job, progress)
            if line != last_line:
                print("\r" + line.ljust(len(last_line)), end="", file=out, flush=True)
                last_line = line
        if job.state in ("complete", "failed"):
            if show:
                print(file=out)
            return job
        await asyncio.sleep(0.25)
