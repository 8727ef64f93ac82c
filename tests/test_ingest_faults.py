"""Killing the ingest service mid-job: the job resumes and the dataset is identical."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from aimesh.datasets_cmd import ingest
from services.ingest.service import IngestService
from shared.client import request
from shared.config import MeshConfig
from shared.names import Names
from shared.schemas import IngestAccepted, IngestJob, IngestRequest
from tests.helpers import ServiceProcess, eventually

pytestmark = pytest.mark.slow


def write_big_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(7)
    block = "\n".join(",".join(f"{v:.5f}" for v in row) + f",{i % 5}" for i, row in enumerate(rng.random((1000, 8))))
    header = ",".join(f"f{i}" for i in range(8)) + ",label\n"
    path.write_text(header + "\n".join([block] * (rows // 1000)) + "\n")


async def test_killed_mid_job_resumes_to_an_identical_dataset(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    data = tmp_path / "big.csv"
    write_big_csv(data, rows=400_000)
    req = IngestRequest(paths=[str(data)], dataset="big", shards=3, label="label", batch_bytes=2048)
    # Slow, small publishes so that the kill lands mid-job; a short ack wait so the job moves on fast.
    env = {"AIMESH_INGEST_JOB_ACK_WAIT_S": "2", "AIMESH_INGEST_MAX_IN_FLIGHT": "1"}

    first = spawn("services.ingest", **env)
    await first.wait_ready(nats_url, names.micro_name("ingest"))
    accepted = await request(nc, names.ingest_submit, req, IngestAccepted, timeout_s=60)
    kv = await nc.jetstream().key_value(names.ingest_bucket)

    async def partway() -> IngestJob | None:
        job = msgspec.json.decode((await kv.get(accepted.job_id)).value or b"", type=IngestJob)
        return job if job.state == "running" and 0 < job.records < 400_000 else None

    await eventually(partway, 60, "the job to be partway")
    first.proc.send_signal(signal.SIGKILL)
    first.wait(10)
    info = await nc.jetstream().stream_info(names.data_stream, subjects_filter=names.data_version_subjects("big", "1"))
    stored_before = sum((info.state.subjects or {}).values())
    assert stored_before > 0

    second = spawn("services.ingest", **env)
    await second.wait_ready(nats_url, names.micro_name("ingest"))
    job, resumed = await ingest(nc, names, req, progress=False)  # running it again: same job, resumed
    assert resumed is not None, job.error
    assert job.job_id == accepted.job_id and job.attempts >= 2

    # The same input through an uninterrupted run, on a separate mesh prefix.
    reference_names = Names(names.prefix + "ref")
    config = MeshConfig(nats_url=nats_url, prefix=reference_names.prefix)
    async with IngestService(config):
        _, reference = await ingest(nc, reference_names, req, progress=False)
    assert reference is not None
    assert [(s.records, s.batches, s.sha256) for s in resumed.shards] == [
        (s.records, s.batches, s.sha256) for s in reference.shards
    ]
    info = await nc.jetstream().stream_info(names.data_stream, subjects_filter=names.data_version_subjects("big", "1"))
    assert sum((info.state.subjects or {}).values()) == sum(s.batches for s in resumed.shards)  # no duplicates
    second.terminate()
    assert await asyncio.to_thread(second.wait, 30) == 0
