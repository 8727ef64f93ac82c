"""Killing the ingest service mid-job: the job resumes and the dataset is identical."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aimesh.jobs import ingest
from services.ingest.job import _input_error
from services.ingest.service import IngestService
from services.ingest.sources import RejectLog
from shared.client import request
from shared.config import IngestConfig, MeshConfig
from shared.errors import BadRequest, Forbidden
from shared.names import Names
from shared.schemas import IngestAccepted, IngestJob, IngestRequest
from tests.helpers import ServiceProcess, eventually

pytestmark = pytest.mark.slow

_job_decoder = msgspec.json.Decoder(IngestJob)


def write_big_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(7)
    block = "\n".join(",".join(f"{v:.5f}" for v in row) + f",{i % 5}" for i, row in enumerate(rng.random((1000, 8))))
    header = ",".join(f"f{i}" for i in range(8)) + ",label\n"
    path.write_text(header + "\n".join([block] * (rows // 1000)) + "\n")


async def test_killed_mid_job_resumes_to_an_identical_dataset(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    data = tmp_path / "big.csv"
    write_big_csv(data, rows=400_000)
    req = IngestRequest(paths=[str(data)], dataset="big", shards=3, label="label", batch_bytes=2048)
    # Slow, small publishes so that the kill lands mid-job; a short ack wait so the job moves on fast.
    env = {
        "AIMESH_INGEST_JOB_ACK_WAIT_S": "2",
        "AIMESH_INGEST_MAX_IN_FLIGHT": "1",
        "AIMESH_INGEST_ROOTS": str(tmp_path),
    }

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
    async with IngestService(config, IngestConfig(roots=[str(tmp_path)])):
        _, reference = await ingest(nc, reference_names, req, progress=False)
    assert reference is not None
    assert [(s.records, s.batches, s.sha256) for s in resumed.shards] == [
        (s.records, s.batches, s.sha256) for s in reference.shards
    ]
    info = await nc.jetstream().stream_info(names.data_stream, subjects_filter=names.data_version_subjects("big", "1"))
    assert sum((info.state.subjects or {}).values()) == sum(s.batches for s in resumed.shards)  # no duplicates
    second.terminate()
    assert await asyncio.to_thread(second.wait, 30) == 0


# -- a bad input fails once, cleanly ---------------------------------------------------------------
ESC = "\x1b"


def write_garbage_csv(path: Path) -> None:
    """A "CSV" of binary junk and terminal escape codes: lines that are not UTF-8, lines with the
    wrong field count, values that are escape sequences (one of them 80 KB long)."""
    rng = np.random.default_rng(3)
    lines = [f"{ESC}[31mx{ESC}[0m,y,label".encode()]  # column names with escapes, too
    for i in range(1200):  # over 1,000 records: the job aborts on its first block, before any progress report
        if i % 40 == 0:
            lines.append(b"\x1b[31m" + rng.integers(128, 256, 20, dtype=np.uint8).tobytes())  # not UTF-8
        elif i % 40 == 1:
            lines.append(f"{ESC}]0;pwned\a{ESC}[2J,1".encode())  # two fields, three expected
        elif i % 20 == 2:
            lines.append(f"{ESC}[31m{i},{ESC}[1A{i},{i % 2}".encode())  # values that do not parse
        else:
            lines.append(f"{i},{i},{i % 2}".encode())
    lines.insert(5, f"{(ESC + '[5m') * 20_000},1,0".encode())  # line 6
    path.write_bytes(b"\n".join(lines) + b"\n")


def no_control_chars(text: str) -> bool:
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


async def test_an_unparsable_file_fails_once_without_raw_bytes_and_gives_its_version_back(
    nats_url: str,
    names: Names,
    nc: NatsClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_garbage_csv(tmp_path / "junk.csv")
    states: list[IngestJob] = []

    async def record(msg: Msg) -> None:
        states.append(_job_decoder.decode(msg.data))

    events = await nc.subscribe(names.ingest_events("*"), cb=record)
    async with IngestService(MeshConfig(nats_url=nats_url, prefix=names.prefix), IngestConfig(roots=[str(tmp_path)])):
        junk = IngestRequest(paths=[str(tmp_path / "junk.csv")], dataset="junk", label="label")
        job, manifest = await ingest(nc, names, junk, progress=False)
        assert manifest is None and job.state == "failed"

        # Failed once: one delivery, no retry, the work-queue message terminated (dead-lettered).
        js = nc.jetstream()

        async def settled() -> bool:
            info = await js.consumer_info(names.ingest_jobs_stream, "ingest-jobs")
            letters = await js.stream_info(names.dead_letter_stream, subjects_filter=names.dead_letter("jobs"))
            return info.num_ack_pending == 0 and sum((letters.state.subjects or {}).values()) == 1

        await eventually(settled, 10, "the job message to be settled")
        info = await js.consumer_info(names.ingest_jobs_stream, "ingest-jobs")
        assert info.delivered.consumer_seq == 1 and info.num_redelivered == 0
        seen = [s for s in states if s.job_id == job.job_id]
        assert job.attempts == 1 and {s.attempts for s in seen if s.state == "running"} == {1}
        assert [s.state for s in seen][-1] == "failed" and "queued" not in [s.state for s in seen[1:]]
        assert not [s for s in seen if "retrying" in s.error]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no ERROR (traceback) logged"

        # What users see holds no raw bytes of the file; the reject report survived the failure.
        assert "rejected" in job.error and no_control_chars(job.error)
        assert job.rejected > 100 and len(job.rejects) == 100
        for row in job.rejects:
            assert no_control_chars(row.reason + row.source + (row.column or "")) and len(row.reason) <= 260
        reasons = {r.reason.split(" (")[0].split(" '")[0] for r in job.rejects}
        assert {"not UTF-8 text", "expected 3 fields, got 2", "cannot parse"} <= reasons
        assert any("\\x1b[31m" in r.reason for r in job.rejects)  # escaped, readable
        (long,) = [r for r in job.rejects if r.line == 6]
        assert long.reason.startswith("cannot parse '\\x1b[5m") and len(long.reason) < 200
        assert all(no_control_chars(r.column or "") for r in job.rejects)
        dead = await js.pull_subscribe(names.dead_letter("jobs"), stream=names.dead_letter_stream)
        (letter,) = await dead.fetch(1, timeout=5)
        assert no_control_chars(letter.headers["Aimesh-Dlq-Reason"]) and letter.headers["Aimesh-Dlq-Deliveries"] == "1"

        # The failed job gave its version back and left no batches.
        assert job.version == ""
        stored = await js.stream_info(names.data_stream)
        assert stored.state.messages == 0
        (tmp_path / "good.csv").write_text("a,b,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(100)))
        good = IngestRequest(paths=[str(tmp_path / "good.csv")], dataset="junk", label="label")
        _, manifest = await ingest(nc, names, good, progress=False)
        assert manifest is not None and manifest.version == "1"
    await events.unsubscribe()


def test_the_reject_report_keeps_input_strings_escaped_and_bounded() -> None:
    rejects = RejectLog()
    rejects.add(f"dir/{ESC}[31mevil.txt", 0, f"bad {ESC}]0;title\a" + "x" * 5000, f"col{ESC}[0m\n")
    (row,) = rejects.rows
    assert row.source == "dir/\\x1b[31mevil.txt" and row.column == "col\\x1b[0m\\n"
    assert row.reason.startswith("bad \\x1b]0;title\\x07xxx") and len(row.reason) < 250


def test_parser_failures_are_permanent_and_shown_escaped() -> None:
    failure = _input_error(ValueError(f"CSV parse error: Row #2: {ESC}[31m{'x' * 5000}\n"), "csv")
    assert isinstance(failure, BadRequest) and failure.code == 400
    assert failure.description.startswith("the input cannot be parsed as csv: CSV parse error: Row #2: \\x1b[31mxx")
    assert no_control_chars(failure.description) and len(failure.description) < 400
    assert _input_error(MemoryError(), "csv").__class__ is MemoryError  # not the input's fault
    forbidden = Forbidden("no")
    assert _input_error(forbidden, "csv") is forbidden
