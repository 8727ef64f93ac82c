"""Wiring of the ingest service.

- ``<prefix>.ingest.submit`` (request/reply): validate the request against its input, find or
  create the job (keyed by the input's fingerprint, so a re-run is the same job and the same
  dataset version), queue it on the ingest work-queue stream, reply at once with the job id.
- the ingest work queue (JetStream, one job at a time per instance): run the job; a job whose
  instance dies is redelivered after ``ack_wait`` and resumes after the last stored batch.
- progress: the job's record in the ingest bucket (watch it) and the same record published on
  ``<prefix>.ingest.<job>.events``.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.ingest import demo
from services.ingest.fingerprint import fingerprint
from services.ingest.job import IngestRun
from services.ingest.sources import open_source
from shared import tracing
from shared.actor import Call
from shared.clock import rfc3339_now
from shared.config import load_ingest_config
from shared.datasets import encode_manifest, latest_key, manifest_key, seq_key
from shared.errors import BadRequest
from shared.kv import next_number
from shared.names import Header, check_token
from shared.schemas import IngestAccepted, IngestJob, IngestJobRef, IngestRequest
from shared.service import Service

log = logging.getLogger(__name__)

_job_codec = msgspec.json.Decoder(IngestJob)
_json = msgspec.json.Encoder()
MAX_ATTEMPTS = 5


class IngestService(Service):
    name = "ingest"
    description = "Shards raw data into versioned datasets in JetStream."

    jobs_kv: KeyValue
    datasets_kv: KeyValue

    async def setup(self) -> None:
        names = self.names
        await self.ensure_dead_letter_stream()
        await self.ensure_stream(
            StreamConfig(
                name=names.data_stream,
                subjects=[names.data_stream_subjects],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_msg_size=1024 * 1024,
                duplicate_window=30 * 60,  # a re-run within 30 min is deduplicated by Nats-Msg-Id
            )
        )
        await self.ensure_stream(
            StreamConfig(
                name=names.ingest_jobs_stream,
                subjects=[names.ingest_jobs],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=120,
            )
        )
        self.ingest_config = load_ingest_config()
        self.jobs_kv = await self.ensure_kv(names.ingest_bucket)
        self.datasets_kv = await self.ensure_kv(names.datasets_bucket)
        self.add_actor("submit", names.ingest_submit, self.submit, IngestRequest, max_concurrency=8)
        self.add_jetstream_actor(
            "jobs",
            stream=names.ingest_jobs_stream,
            subject=names.ingest_jobs,
            durable="ingest-jobs",
            handler=self.run_job,
            request_type=IngestJobRef,
            max_concurrency=1,
            max_deliver=MAX_ATTEMPTS,
            ack_wait_s=self.ingest_config.job_ack_wait_s,
            retry_backoff_s=2,
        )

    # -- submit ----------------------------------------------------------------------------------
    async def submit(self, req: IngestRequest, _: Call) -> IngestAccepted:
        try:
            check_token(req.dataset, "dataset name")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        paths, fmt, label = await asyncio.to_thread(demo.resolve, req.paths)
        if fmt is not None:
            req = msgspec.structs.replace(req, paths=paths, format=fmt, label=req.label or label)
        source = await asyncio.to_thread(open_source, req)
        fp = await asyncio.to_thread(fingerprint, req, source.format, source.paths)
        job_id = f"{req.dataset}-{fp[:12]}"
        job = await self._get_job(job_id)
        enqueue = False
        if job is None:
            job, enqueue = await self._create_job(job_id, req, fp)
        elif job.state == "failed":  # a re-run of a failed job tries again, resuming its batches
            job = msgspec.structs.replace(job, state="queued", error="", attempts=0, updated_at=rfc3339_now())
            await self._put_job(job)
            enqueue = True
        # A queued or running job already has its message on the work queue (it stays there until
        # the job ends), so submitting it again only answers where it stands.
        if enqueue:
            headers = {Header.MSG_ID: f"{job_id}/{job.updated_at}"}
            tracing.inject(headers)
            await self.js.publish(
                self.names.ingest_jobs, msgspec.msgpack.encode(IngestJobRef(job_id=job_id)), headers=headers
            )
        return IngestAccepted(
            job_id=job_id,
            dataset=job.dataset,
            version=job.version,
            state=job.state,
            events=self.names.ingest_events(job_id),
        )

    async def _create_job(self, job_id: str, req: IngestRequest, fp: str) -> tuple[IngestJob, bool]:
        """The new job, True; or, when a concurrent submit of the same input created it, that
        job and False."""
        now = rfc3339_now()
        job = IngestJob(
            job_id=job_id,
            dataset=req.dataset,
            version="",
            fingerprint=fp,
            request=req,
            state="queued",
            created_at=now,
            updated_at=now,
        )
        try:
            await self.jobs_kv.create(job_id, _json.encode(job))
        except KeyWrongLastSequenceError:  # a concurrent submit of the same input won the race
            existing = await self._get_job(job_id)
            assert existing is not None
            return existing, False
        job = msgspec.structs.replace(job, version=str(await next_number(self.datasets_kv, seq_key(req.dataset))))
        await self._put_job(job)
        return job, True

    # -- running a job ---------------------------------------------------------------------------
    async def run_job(self, ref: IngestJobRef, call: Call) -> None:
        found = await self._get_job(ref.job_id)
        if found is None:
            raise BadRequest(f"unknown ingest job {ref.job_id}")
        if found.state == "complete":
            return
        job = found
        deliveries = call.msg.metadata.num_delivered or 1
        job = msgspec.structs.replace(job, state="running", attempts=deliveries, error="", updated_at=rfc3339_now())
        await self._report(job)
        try:
            source = await asyncio.to_thread(open_source, job.request, parse_threads=self.ingest_config.parse_threads)
            job = msgspec.structs.replace(job, bytes_total=source.bytes_total)

            async def progress(figures: dict[str, object]) -> None:
                nonlocal job
                job = msgspec.structs.replace(job, updated_at=rfc3339_now(), **figures)
                await self._report(job)

            run = IngestRun(self.js, self.names, job, source, progress, max_in_flight=self.ingest_config.max_in_flight)
            manifest = await run.run()
        except BadRequest as exc:
            await self._report(
                msgspec.structs.replace(job, state="failed", error=exc.description, updated_at=rfc3339_now())
            )
            raise
        except Exception as exc:
            final = deliveries >= MAX_ATTEMPTS
            state = "failed" if final else "queued"
            why = f"{type(exc).__name__}: {exc}" + ("" if final else f" (attempt {deliveries}; retrying)")
            await self._report(msgspec.structs.replace(job, state=state, error=why, updated_at=rfc3339_now()))
            raise
        await self.datasets_kv.put(manifest_key(manifest.dataset, manifest.version), encode_manifest(manifest))
        await self.datasets_kv.put(latest_key(manifest.dataset), manifest.version.encode())
        done = msgspec.structs.replace(
            job,
            state="complete",
            batches=sum(s.batches for s in manifest.shards),
            records=manifest.records,
            updated_at=rfc3339_now(),
        )
        await self._report(done)
        log.info(
            "dataset %s@%s complete: %d records in %d shards, %d rejected",
            manifest.dataset,
            manifest.version,
            manifest.records,
            len(manifest.shards),
            manifest.rejected,
        )

    # -- job records -----------------------------------------------------------------------------
    async def _get_job(self, job_id: str) -> IngestJob | None:
        try:
            entry = await self.jobs_kv.get(job_id)
        except KeyNotFoundError:
            return None
        return _job_codec.decode(entry.value or b"")

    async def _put_job(self, job: IngestJob) -> None:
        await self.jobs_kv.put(job.job_id, _json.encode(job))

    async def _report(self, job: IngestJob) -> None:
        """Record the job's state and announce it on its events subject."""
        body = _json.encode(job)
        await self.jobs_kv.put(job.job_id, body)
        await self.nc.publish(self.names.ingest_events(job.job_id), body)
