"""One ingest run: parse (worker thread) → shard → encode → publish (event loop), overlapped.

The parser thread hands blocks over through a bounded queue, so parsing the next chunks and
publishing the previous batches happen at the same time and memory stays bounded.

Resuming: before publishing, the run asks the stream how many batches of each shard are already
stored (they are contiguous from 0, else that shard is purged and redone), then re-parses the
input and skips publishing those batches.  Batches are deterministic, so their bytes, and the
per-shard sha256 over them, equal an uninterrupted run's.

Batches carry ``Nats-Msg-Id`` = ``<job id>/<version>/<shard>/<batch>``: a retry of the same job is
deduplicated, and a version number that a failed job gave back can be used by another job at
once (its batches do not collide with the failed job's in the duplicate window).  Stored batches
that another job left under this version are purged, never resumed.

The manifest is written only after every batch is acked and the stream's per-shard counts match:
a visible manifest means a complete, checksummed dataset.  A run that fails for a reason a retry
cannot fix (too many rejects, no valid record, an input that cannot be parsed) raises a 4xx
``ServiceError``; whatever the parser thread raises counts as such (the input is at fault, and a
retry would fail the same way).  The caller purges the version (:func:`purge_version`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.ingest.printable import printable
from services.ingest.publish import BatchPublisher
from services.ingest.sharding import ShardBatch, Sharder, batch_rows_for
from services.ingest.sources import Block, RejectLog, Source
from shared import tracing
from shared.batches import column_spec, encode_batch
from shared.clock import rfc3339_now
from shared.errors import BadRequest, ServiceError
from shared.handoff import Handoff
from shared.names import Header, Names
from shared.schemas import ColumnSpec, DatasetManifest, IngestJob, ShardInfo

log = logging.getLogger(__name__)

MIN_ROWS_FOR_EARLY_ABORT = 1000


@dataclass
class _ShardTally:
    records: int = 0
    batches: int = 0
    bytes: int = 0
    sha256: hashlib._Hash | None = None


class IngestRun:
    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        job: IngestJob,
        source: Source,
        progress: Callable[[dict[str, object]], Awaitable[None]],
        progress_every_s: float = 0.5,
        max_in_flight: int = 64,
        shown_as: dict[str, str] | None = None,
    ) -> None:
        """``shown_as``: names to show for source paths in the reject report and the manifest
        (an upload's temp file is shown as ``upload:<name>``)."""
        self.js = js
        self.names = names
        self.job = job
        self.source = source
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.max_in_flight = max_in_flight
        self.rejects = RejectLog()
        self.records = 0
        self.classes = 0
        self.bytes_read = 0
        self.shown_as = shown_as or {}
        self.started = time.monotonic()
        self._stop = threading.Event()

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> DatasetManifest:
        request = self.job.request
        resume = await self._stored_batches()
        if any(resume):
            log.info("%s: resuming; batches already stored per shard: %s", self.job.job_id, resume)
        tallies = [_ShardTally(sha256=hashlib.sha256()) for _ in range(request.shards)]
        publisher = BatchPublisher(self.js, max_in_flight=self.max_in_flight)
        sharder: Sharder | None = None
        columns: list[ColumnSpec] | None = None
        key = "y" if request.shard_by and request.shard_by == self.source.label else request.shard_by
        last_report = 0.0
        self.started = time.monotonic()
        try:
            async for block in self._blocks():
                self.bytes_read = block.bytes_read
                if not len(block):
                    continue
                if sharder is None:
                    columns, sharder = self._plan(block, key)
                self._count(block)
                for batch in sharder.add(block.columns):
                    await self._emit(batch, tallies, resume, publisher)
                self._check_rejects(final=False)
                if time.monotonic() - last_report >= self.progress_every_s:
                    last_report = time.monotonic()
                    await self.progress(self.figures())
            if sharder is not None:
                for batch in sharder.flush():
                    await self._emit(batch, tallies, resume, publisher)
            await publisher.flush()
            self._check_rejects(final=True)
            if self.records == 0 or columns is None:
                raise BadRequest(f"no valid records in the input ({self.rejects.count} rejected)")
            await self._verify(tallies)
        finally:
            self._stop.set()
        await self.progress(self.figures())
        return self._manifest(columns, tallies)

    def _plan(self, first: Block, key: str | None) -> tuple[list[ColumnSpec], Sharder]:
        """The dataset's columns and the sharder's batch size, from the first block."""
        request = self.job.request
        columns = [column_spec(name, values) for name, values in first.columns.items()]
        if key is not None and key not in first.columns:
            raise BadRequest(f"shard_by column {request.shard_by!r} is not among {list(first.columns)}")
        per_record = sum(v[:1].nbytes for v in first.columns.values()) or 1
        return columns, Sharder(request.shards, batch_rows_for(per_record, request.batch_bytes), key)

    def _count(self, block: Block) -> None:
        self.records += len(block)
        labels = block.columns.get("y")
        if labels is not None and labels.dtype.kind == "i" and len(labels):
            self.classes = max(self.classes, int(labels.max()) + 1)

    async def _blocks(self) -> AsyncIterator[Block]:
        """The source's blocks, parsed in a worker thread, through a bounded queue."""
        loop = asyncio.get_running_loop()
        handoff: Handoff[Block | BaseException | None] = Handoff(loop, 4)

        def produce() -> None:
            try:
                for block in self.source.blocks(self.rejects):
                    if self._stop.is_set() or not handoff.put(block):
                        return
                handoff.put(None)
            except BaseException as exc:  # handed to the event loop, raised there
                handoff.put(exc)

        thread = threading.Thread(target=produce, name=f"parse-{self.job.job_id}", daemon=True)
        thread.start()
        try:
            while (item := await handoff.get()) is not None:
                if isinstance(item, BaseException):
                    failure = _input_error(item, self.source.format)
                    if failure is item:
                        raise item
                    raise failure from item
                yield item
        finally:
            self._stop.set()
            handoff.close()  # a producer waiting for a slot gives up

    async def _emit(
        self, batch: ShardBatch, tallies: list[_ShardTally], resume: list[int], publisher: BatchPublisher
    ) -> None:
        job = self.job
        body = encode_batch(
            dataset=job.dataset,
            version=job.version,
            shard=batch.shard,
            batch=batch.batch,
            offset=batch.offset,
            columns=batch.columns,
        )
        tally = tallies[batch.shard]
        assert tally.sha256 is not None
        tally.sha256.update(body)
        tally.records += batch.count
        tally.batches += 1
        tally.bytes += len(body)
        if batch.batch < resume[batch.shard]:
            return  # stored by an earlier attempt
        subject = self.names.data_subject(job.dataset, job.version, batch.shard)
        msg_id = f"{self._msg_id_prefix}{batch.shard}/{batch.batch}"
        await publisher.publish(subject, body, msg_id, batch.batch)

    def _check_rejects(self, *, final: bool) -> None:
        seen = self.records + self.rejects.count
        limit = self.job.request.max_reject_ratio
        if not seen or (not final and seen < MIN_ROWS_FOR_EARLY_ABORT):
            return
        ratio = self.rejects.count / seen
        if ratio > limit:
            where = "" if final else f" after {seen} records"
            raise BadRequest(
                f"{self.rejects.count} of {seen} records rejected ({ratio:.2%}){where}, above max_reject_ratio "
                f"({limit:.2%}): fix the input (see the reject report) or raise --max-reject-ratio"
            )

    # -- the stream ------------------------------------------------------------------------------
    @property
    def _msg_id_prefix(self) -> str:
        return f"{self.job.job_id}/{self.job.version}/"

    async def _stored_batches(self) -> list[int]:
        """Batches already stored per shard; a shard whose stored batches are not 0..k-1, or
        not this job's, is purged."""
        job = self.job
        counts = await self._subject_counts()
        resume = []
        for shard in range(job.request.shards):
            subject = self.names.data_subject(job.dataset, job.version, shard)
            count = counts.get(subject, 0)
            if count:
                last = await self.js.get_last_msg(self.names.data_stream, subject)
                headers = last.headers or {}
                last_batch = int(headers.get(Header.BATCH, "-1"))
                ours = headers.get(Header.MSG_ID, "").startswith(self._msg_id_prefix)
                if last_batch + 1 != count or not ours:
                    log.warning(
                        "%s: shard %d has %d batches stored, the last #%d%s; redoing it",
                        job.job_id,
                        shard,
                        count,
                        last_batch,
                        "" if ours else " of another job",
                    )
                    await self.js.purge_stream(self.names.data_stream, subject=subject)
                    count = 0
            resume.append(count)
        return resume

    async def _subject_counts(self) -> dict[str, int]:
        subjects = self.names.data_version_subjects(self.job.dataset, self.job.version)
        try:
            info = await self.js.stream_info(self.names.data_stream, subjects_filter=subjects)
        except NotFoundError:
            return {}
        return dict(info.state.subjects or {})

    async def _verify(self, tallies: list[_ShardTally]) -> None:
        counts = await self._subject_counts()
        for shard, tally in enumerate(tallies):
            subject = self.names.data_subject(self.job.dataset, self.job.version, shard)
            stored = counts.get(subject, 0)
            if stored != tally.batches:
                raise RuntimeError(f"shard {shard}: {stored} batches stored, {tally.batches} expected")

    # -- results -----------------------------------------------------------------------------
    def figures(self) -> dict[str, object]:
        """The job record's progress fields, reject report included (also after a failure)."""
        rows = list(self.rejects.rows)
        if self.shown_as:
            rows = [msgspec.structs.replace(r, source=self.shown_as.get(r.source, r.source)) for r in rows]
        return {
            "records": self.records,
            "rejected": self.rejects.count,
            "bytes_read": self.bytes_read,
            "rejects": rows,
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }

    def _manifest(self, columns: list[ColumnSpec], tallies: list[_ShardTally]) -> DatasetManifest:
        job = self.job
        request = job.request
        shards = [
            ShardInfo(
                index=i,
                subject=self.names.data_subject(job.dataset, job.version, i),
                records=t.records,
                batches=t.batches,
                bytes=t.bytes,
                sha256=t.sha256.hexdigest() if t.sha256 else "",
            )
            for i, t in enumerate(tallies)
        ]
        ids = tracing.current_ids()
        return DatasetManifest(
            dataset=job.dataset,
            version=job.version,
            format=self.source.format,
            columns=columns,
            features=list(self.source.features),
            label=self.source.label,
            label_classes=list(self.source.label_classes),
            classes=max(self.classes, len(self.source.label_classes)),
            sharding=f"hash:{request.shard_by}" if request.shard_by else "round_robin",
            shards=shards,
            records=sum(s.records for s in shards),
            rejected=self.rejects.count,
            bytes=sum(s.bytes for s in shards),
            created_at=rfc3339_now(),
            sources=[self.shown_as.get(str(p), str(p)) for p in self.source.paths],
            fingerprint=job.fingerprint,
            job_id=job.job_id,
            tokenizer=self.source.tokenizer,
            trace_id=ids[0] if ids else "",
        )


async def purge_version(js: JetStreamContext, names: Names, dataset: str, version: str) -> bool:
    """Remove a version's batches (a failed job leaves no half-made dataset); False when the
    purge failed (logged), so the caller keeps the version out of reuse."""
    subjects = names.data_version_subjects(dataset, version)
    try:
        await js.purge_stream(names.data_stream, subject=subjects)
    except NotFoundError:
        return True  # no data stream: nothing stored
    except Exception:
        log.warning("could not purge %s", subjects, exc_info=True)
        return False
    return True


def _input_error(exc: BaseException, fmt: str) -> BaseException:
    """What the parser thread raised, as the job's failure: a ``ServiceError`` as it is; any
    other exception means the input cannot be parsed (a permanent, 400 failure), with a message
    that holds no raw bytes of the input (pyarrow quotes the offending row)."""
    if isinstance(exc, ServiceError) or not isinstance(exc, Exception) or isinstance(exc, MemoryError):
        return exc
    log.debug("the %s parser failed", fmt, exc_info=exc)
    return BadRequest(f"the input cannot be parsed as {fmt}: {printable(str(exc) or type(exc).__name__, 300)}")
