"""What a training job recorded about its attempts and checkpoints (the jobs bucket), and the
checks on them that the single-host and multi-host fault tests share."""

from __future__ import annotations

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.trainer.worker import AttemptRecord
from shared.schemas import Checkpoint, TrainJob


async def job_record(kv: KeyValue, job_id: str) -> TrainJob:
    return msgspec.json.decode((await kv.get(f"job.{job_id}")).value or b"", type=TrainJob)


async def attempt_record(kv: KeyValue, job_id: str, attempt: int) -> AttemptRecord:
    return msgspec.json.decode((await kv.get(f"attempt.{job_id}.{attempt}")).value or b"", type=AttemptRecord)


async def first_attempt_record(kv: KeyValue, job_id: str, attempts: range) -> AttemptRecord:
    for attempt in attempts:
        try:
            return await attempt_record(kv, job_id, attempt)
        except KeyNotFoundError:
            continue
    raise AssertionError(f"no attempt record among attempts {list(attempts)} of {job_id}")


async def checkpoint_of(kv: KeyValue, job_id: str) -> Checkpoint | None:
    try:
        return msgspec.json.decode((await kv.get(f"checkpoint.{job_id}")).value or b"", type=Checkpoint)
    except KeyNotFoundError:
        return None


def assert_resumed_from(record: AttemptRecord, seen: Checkpoint) -> None:
    """The attempt started where its checkpoint left off (scaled to its own steps per epoch), from
    a checkpoint of the first attempt no older than ``seen``, not from step 0."""
    assert record.checkpoint and record.checkpoint_attempt == 1, record
    assert (record.checkpoint_epoch, record.checkpoint_step) >= (seen.epoch, seen.step), (record, seen)
    scaled = round(record.checkpoint_step * record.steps_per_epoch / record.checkpoint_steps_per_epoch)
    assert (record.start_epoch, record.start_step) == (record.checkpoint_epoch, min(scaled, record.steps_per_epoch))
    assert (record.start_epoch, record.start_step) != (0, 0), record


def assert_trained_the_rest(record: AttemptRecord, epochs: int) -> None:
    """The attempt trained exactly the steps left after its start position."""
    done = record.start_epoch * record.steps_per_epoch + record.start_step
    assert record.steps_trained == epochs * record.steps_per_epoch - done, record
