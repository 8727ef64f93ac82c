"""Wiring of the ingest service.

- ``<prefix>.ingest.submit`` (request/reply): validate the request against its input, find or
  create the job (keyed by the input's fingerprint, so a re-run is the same job and the same
  dataset version), queue it on the ingest work-queue stream, reply at once with the job id.
  Paths are read only under the configured roots (``services/ingest/access.py``); an upload is
  named by its object in the uploads bucket (``services/ingest/uploads.py``).
- the ingest work queue (JetStream, one job at a time per instance): run the job; a job whose
  instance dies is redelivered after ``ack_wait`` and resumes after the last stored batch.
- failures: a bad input (4xx: too many rejects, unparsable, a path no longer allowed) fails the
  job at once and for good (the JetStream actor dead-letters and terms the message: no retry);
  anything else is retried, up to ``MAX_ATTEMPTS`` deliveries.  A job that fails for good purges
  its batches, keeps its reject report, and gives its version number back.
- progress: the job's record in the ingest bucket (watch it) and the same record published on
  ``<prefix>.ingest.<job>.events``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import msgspec
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.ingest import demo
from services.ingest.access import Roots
from services.ingest.fingerprint import fingerprint, upload_fingerprint
from services.ingest.job import IngestRun, purge_version
from services.ingest.printable import printable
from services.ingest.sources import Source, open_source
from services.ingest.sources.formats import FORMATS, format_for_name
from services.ingest.uploads import ensure_uploads, fetch_upload, file_name_of, upload_info
from services.ingest.versions import give_back
from shared import tracing, transient
from shared.actor import ActorConfig, Call
from shared.clock import rfc3339_now
from shared.config import IngestConfig, MeshConfig, load_ingest_config
from shared.datasets import encode_manifest
from shared.errors import BadRequest, ServiceError
from shared.jsactor import JetStreamActorConfig
from shared.kv import next_number
from shared.names import Header, check_token, dataset_latest_key, dataset_seq_key, ingest_job_key, manifest_key
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
    uploads: ObjectStore

    def __init__(self, config: MeshConfig, ingest: IngestConfig | None = None) -> None:
        super().__init__(config)
        self.ingest_config = ingest or IngestConfig()
        self.roots = Roots.from_config(self.ingest_config.roots)
        self.tmp_dir: Path | None = None  # made by setup(): uploads are copied there

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        return cls(config, load_ingest_config(env))

    async def setup(self) -> None:
        names = self.names
        log.info("reading inputs only under: %s", self.roots)
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
        self.jobs_kv = await self.ensure_kv(names.ingest_bucket)
        self.datasets_kv = await self.ensure_kv(names.datasets_bucket)
        self.uploads = await transient.retry_not_now(
            "the uploads store", lambda: ensure_uploads(self.js, names, self.config.js_replicas)
        )
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="aimesh-ingest-"))  # 0700: uploads are copied here
        self.add_actor(
            ActorConfig(name="submit", subject=names.ingest_submit, max_concurrency=8), self.submit, IngestRequest
        )
        self.add_jetstream_actor(
            JetStreamActorConfig(
                name="jobs",
                stream=names.ingest_jobs_stream,
                subject=names.ingest_jobs,
                durable="ingest-jobs",
                max_concurrency=1,
                max_deliver=MAX_ATTEMPTS,
                ack_wait_s=self.ingest_config.job_ack_wait_s,
                retry_backoff_s=2,
            ),
            self.run_job,
            IngestJobRef,
        )

    async def close_resources(self) -> None:
        if self.tmp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.tmp_dir, True)

    # -- submit ----------------------------------------------------------------------------------
    async def submit(self, req: IngestRequest, _: Call) -> IngestAccepted:
        try:
            check_token(req.dataset, "dataset name")
            if req.object is not None:
                check_token(req.object, "upload name")
        except ValueError as exc:
            raise BadRequest(printable(str(exc))) from None
        if req.object is not None:
            if req.paths:
                raise BadRequest("give either paths or the object of an upload, not both")
            req, fp = await self._check_upload(req)
        else:
            req, source = await asyncio.to_thread(self._open_paths, req, 2)
            fp = await asyncio.to_thread(fingerprint, req, source.format, source.paths)
        job_id = f"{req.dataset}-{fp[:12]}"
        found = await self._get_job(job_id)
        enqueue = False
        if found is None:
            job, enqueue = await self._create_job(job_id, req, fp)
        elif found[0].state == "failed":  # a re-run of a failed job tries again
            job, enqueue = await self._restart_job(*found)
        else:
            job = found[0]
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

    def _open_paths(self, req: IngestRequest, parse_threads: int) -> tuple[IngestRequest, Source]:
        """(the request as the job keeps it, its source): demo names resolved on this side and
        read from the demo folder only; other paths checked against the roots and kept as their
        real paths.  Blocking (it stats and may write the demo files): run it in a thread."""
        paths, fmt, label = demo.resolve(req.paths)
        if fmt is not None:
            req = msgspec.structs.replace(req, format=fmt, label=req.label or label)
            return req, open_source(
                msgspec.structs.replace(req, paths=paths), demo.roots(), parse_threads=parse_threads
            )
        source = open_source(req, self.roots, parse_threads=parse_threads)
        return msgspec.structs.replace(req, paths=[str(p) for p in source.inputs]), source

    async def _check_upload(self, req: IngestRequest) -> tuple[IngestRequest, str]:
        """(the request with its format, the fingerprint) of a request naming an upload."""
        assert req.object is not None
        info = await upload_info(self.uploads, req.object, self.ingest_config.max_upload_bytes)
        fmt = req.format or format_for_name(file_name_of(info))
        if fmt is None:
            raise BadRequest(
                f"cannot tell the format of upload {req.object!r} (no file name with a known extension in its "
                f"description): pass format ({'|'.join(FORMATS)})"
            )
        if fmt not in FORMATS:
            raise BadRequest(f"unknown format {printable(repr(fmt))}: use one of {', '.join(FORMATS)}")
        if not info.size:
            raise BadRequest("the input is empty")
        req = msgspec.structs.replace(req, format=fmt)
        return req, upload_fingerprint(req, fmt, info.size, info.digest or "")

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
            await self.jobs_kv.create(ingest_job_key(job_id), _json.encode(job))
        except KeyWrongLastSequenceError:  # a concurrent submit of the same input won the race
            existing = await self._get_job(job_id)
            assert existing is not None
            return existing[0], False
        job = msgspec.structs.replace(job, version=await self._new_version(req.dataset))
        await self._put_job(job)
        return job, True

    async def _restart_job(self, failed: IngestJob, revision: int) -> tuple[IngestJob, bool]:
        """A failed job queued again (compare-and-set: one of concurrent re-submits does it).  It
        keeps its version if it could not give it back, else takes the next one."""
        job = msgspec.structs.replace(
            failed,
            state="queued",
            error="",
            attempts=0,
            records=0,
            rejected=0,
            rejects=[],
            bytes_read=0,
            batches=0,
            elapsed_s=0.0,
            updated_at=rfc3339_now(),
        )
        try:
            await self.jobs_kv.update(ingest_job_key(job.job_id), _json.encode(job), last=revision)
        except KeyWrongLastSequenceError:
            current = await self._get_job(job.job_id)
            assert current is not None
            return current[0], False
        if not job.version:
            job = msgspec.structs.replace(job, version=await self._new_version(job.dataset))
            await self._put_job(job)
        return job, True

    async def _new_version(self, dataset: str) -> str:
        return str(await next_number(self.datasets_kv, dataset_seq_key(dataset)))

    # -- running a job ---------------------------------------------------------------------------
    async def run_job(self, ref: IngestJobRef, call: Call) -> None:
        found = await self._get_job(ref.job_id)
        if found is None:
            raise BadRequest(f"unknown ingest job {ref.job_id}")
        job = found[0]
        if job.state == "complete":
            return
        if job.state == "failed" or not job.version:
            raise BadRequest(f"ingest job {ref.job_id} has failed: submit it again to retry")
        deliveries = call.msg.metadata.num_delivered or 1
        job = msgspec.structs.replace(job, state="running", attempts=deliveries, error="", updated_at=rfc3339_now())
        await self._report(job)
        run: IngestRun | None = None
        shown_as: dict[str, str] = {}
        upload_dir = self.tmp_dir / job.job_id if self.tmp_dir and job.request.object else None
        try:
            source = await self._open_for_run(job, upload_dir, shown_as)
            job = msgspec.structs.replace(job, bytes_total=source.bytes_total)

            async def progress(figures: dict[str, object]) -> None:
                nonlocal job
                job = msgspec.structs.replace(job, updated_at=rfc3339_now(), **figures)
                await self._report(job)

            run = IngestRun(
                self.js,
                self.names,
                job,
                source,
                progress,
                max_in_flight=self.ingest_config.max_in_flight,
                shown_as=shown_as,
            )
            manifest = await run.run()
        except Exception as exc:
            permanent = isinstance(exc, ServiceError) and exc.code < 500
            why = exc.description if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            for path, shown in shown_as.items():
                why = why.replace(path, shown)
            why = printable(why)
            if permanent or deliveries >= MAX_ATTEMPTS:
                await self._fail(job, run, why)
                if permanent:  # the description travels (dead-letter headers): sanitised, no temp paths
                    raise type(exc)(why) from exc
                raise
            figures = run.figures() if run is not None else {}
            retry = f"{why} (attempt {deliveries} of {MAX_ATTEMPTS}; retrying)"
            await self._report(
                msgspec.structs.replace(job, state="queued", error=retry, updated_at=rfc3339_now(), **figures)
            )
            raise
        finally:
            if upload_dir is not None:
                await asyncio.to_thread(shutil.rmtree, upload_dir, True)
        await self.datasets_kv.put(manifest_key(manifest.dataset, manifest.version), encode_manifest(manifest))
        await self.datasets_kv.put(dataset_latest_key(manifest.dataset), manifest.version.encode())
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

    async def _open_for_run(self, job: IngestJob, upload_dir: Path | None, shown_as: dict[str, str]) -> Source:
        """The job's source, its paths checked again (they may have changed since the submit).
        An upload is first copied into ``upload_dir`` (checked against the fingerprint the job
        was submitted with); ``shown_as`` gets the name to show for the copy."""
        threads = self.ingest_config.parse_threads
        req = job.request
        if req.object is None:
            _, source = await asyncio.to_thread(self._open_paths, req, threads)
            return source
        assert upload_dir is not None and req.format is not None
        max_bytes = self.ingest_config.max_upload_bytes
        info = await upload_info(self.uploads, req.object, max_bytes)
        if upload_fingerprint(req, req.format, info.size or 0, info.digest or "") != job.fingerprint:
            raise BadRequest(f"upload {req.object!r} changed after the job was submitted: submit it again")
        await asyncio.to_thread(shutil.rmtree, upload_dir, True)  # a copy left by an earlier attempt
        await asyncio.to_thread(upload_dir.mkdir, 0o700)
        copy = upload_dir / "upload"
        shown_as[str(copy)] = f"upload:{req.object}"
        await fetch_upload(self.uploads, info, copy, max_bytes)
        local = msgspec.structs.replace(req, paths=[str(copy)], object=None)
        return await asyncio.to_thread(open_source, local, Roots([upload_dir]), parse_threads=threads)

    async def _fail(self, job: IngestJob, run: IngestRun | None, why: str) -> None:
        """Fail the job for good: its batches purged, its version given back when it is still the
        last one handed out (and the purge worked), the reject report kept in the record."""
        figures = run.figures() if run is not None else {}
        version = job.version
        if await purge_version(self.js, self.names, job.dataset, version) and await give_back(
            self.datasets_kv, job.dataset, version
        ):
            version = ""
        failed = msgspec.structs.replace(
            job, state="failed", error=why, version=version, updated_at=rfc3339_now(), **figures
        )
        await self._report(failed)
        log.info("ingest %s failed: %s", job.job_id, why)

    # -- job records -----------------------------------------------------------------------------
    async def _get_job(self, job_id: str) -> tuple[IngestJob, int] | None:
        """The job record and its revision (for compare-and-set)."""
        try:
            entry = await self.jobs_kv.get(ingest_job_key(job_id))
        except KeyNotFoundError:
            return None
        return _job_codec.decode(entry.value or b""), entry.revision or 0

    async def _put_job(self, job: IngestJob) -> None:
        await self.jobs_kv.put(ingest_job_key(job.job_id), _json.encode(job))

    async def _report(self, job: IngestJob) -> None:
        """Record the job's state and announce it on its events subject."""
        body = _json.encode(job)
        await self.jobs_kv.put(ingest_job_key(job.job_id), body)
        await self.nc.publish(self.names.ingest_events(job.job_id), body)
