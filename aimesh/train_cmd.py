"""``aimesh train`` and ``aimesh models``: clients of the trainer agents and the registry."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError

from aimesh.datasets_cmd import connect_once, exit_code
from shared.client import request
from shared.errors import MeshError
from shared.names import Names, job_key, progress_key
from shared.registry import aliases, get_version, list_versions, registry_kv, set_alias
from shared.schemas import ModelVersion, TrainAccepted, TrainJob, TrainProgress, TrainRequest

_job = msgspec.json.Decoder(TrainJob)
_progress = msgspec.json.Decoder(TrainProgress)


def progress_text(job: TrainJob, progress: TrainProgress | None) -> str:
    head = f"{job.job_id} attempt {job.attempt} {job.state}"
    if job.state == "forming":
        return f"{head}: waiting for {job.request.nodes} trainer nodes, {len(job.members)} joined"
    if progress is None or progress.attempt != job.attempt:
        return f"{head}: {job.world} ranks starting"
    return (
        f"{head}: epoch {progress.epoch + 1}/{job.request.epochs} step {progress.step}/{progress.steps_per_epoch} "
        f"loss {progress.loss:.4f}  {progress.samples_per_s:,.0f} samples/s  ranks {progress.world}"
    )


async def train(
    nc: NatsClient, names: Names, req: TrainRequest, *, show: bool = True, out: Any = sys.stderr
) -> TrainJob:
    """Submit and follow a training job to its end."""
    accepted = await request(nc, names.train_submit, req, TrainAccepted, timeout_s=60)
    kv = await nc.jetstream().key_value(names.jobs_bucket)
    last_line = ""
    last_attempt = 0
    while True:
        job = _job.decode((await kv.get(job_key(accepted.job_id))).value or b"")
        try:
            progress: TrainProgress | None = _progress.decode((await kv.get(progress_key(job.job_id))).value or b"")
        except KeyNotFoundError:
            progress = None
        if show:
            if job.attempt != last_attempt and job.attempt > 1:
                print(f"\n{job.job_id}: attempt {job.attempt - 1} failed: {job.error}; re-forming", file=out)
            last_attempt = job.attempt
            line = progress_text(job, progress)
            if line != last_line:
                print("\r" + line.ljust(len(last_line)), end="", file=out, flush=True)
                last_line = line
        if job.state in ("complete", "failed"):
            if show:
                print(file=out)
            return job
        await asyncio.sleep(0.25)


async def cmd_train(url: str, names: Names, req: TrainRequest, as_json: bool) -> int:
    nc = await connect_once(url)
    try:
        job = await train(nc, names, req, show=not as_json and sys.stderr.isatty())
        version = None
        if job.state == "complete":
            version = await get_version(await registry_kv(nc.jetstream(), names), job.request.model, job.model_version)
    except MeshError as exc:
        print(f"aimesh train: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    if as_json:
        doc = {"job": msgspec.to_builtins(job), "model": msgspec.to_builtins(version) if version else None}
        print(msgspec.json.encode(doc).decode())
    elif version is not None:
        print(version_text(version))
    else:
        print(f"training {job.job_id} failed: {job.error}", file=sys.stderr)
    return 0 if version is not None else 1


def version_text(v: ModelVersion, alias_map: dict[str, str] | None = None) -> str:
    names = [a for a, n in (alias_map or {}).items() if n == v.version]
    metrics = ", ".join(f"{k} {val:.4g}" for k, val in sorted(v.metrics.items()))
    return "\n".join(
        [
            f"model {v.model}@{v.version}{' (' + ', '.join(sorted(names)) + ')' if names else ''}: {v.task}, "
            f"{v.factory} {v.kwargs}",
            f"metrics: {metrics or 'none'}",
            f"trained on {v.dataset} by job {v.job_id}; artifact {v.artifact}",
            f"trace {v.trace_id or '-'} (dataset's: {v.dataset_trace_id or '-'}); created {v.created_at}",
        ]
    )


async def cmd_models(url: str, names: Names, ref: str | None, as_json: bool) -> int:
    nc = await connect_once(url)
    try:
        kv = await registry_kv(nc.jetstream(), names)
        if ref is None:
            versions = await list_versions(kv)
            if as_json:
                print(msgspec.json.encode(versions).decode())
            elif not versions:
                print("no models yet")
            else:
                print(f"{'MODEL':<24} {'TASK':<9} {'DATASET':<16} {'METRICS'}")
                for v in versions:
                    metrics = ", ".join(
                        f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()) if k.startswith("eval_")
                    )
                    print(f"{v.model + '@' + v.version:<24} {v.task:<9} {v.dataset:<16} {metrics}")
            return 0
        model, _, version_ref = ref.partition("@")
        version = await get_version(kv, model, version_ref or None)
        alias_map = await aliases(kv, model)
        print(msgspec.json.encode(version).decode() if as_json else version_text(version, alias_map))
        return 0
    except MeshError as exc:
        print(f"aimesh models: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


async def cmd_alias(url: str, names: Names, ref: str, alias: str) -> int:
    model, _, version = ref.partition("@")
    nc = await connect_once(url)
    try:
        kv = await registry_kv(nc.jetstream(), names)
        target = await get_version(kv, model, version)
        await set_alias(kv, model, alias, target.version)
        print(f"{model}@{alias} → version {target.version}")
        return 0
    except (MeshError, ValueError) as exc:
        print(f"aimesh models alias: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


__all__ = ["cmd_alias", "cmd_models", "cmd_train", "nats", "progress_text", "train"]
