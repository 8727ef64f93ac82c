"""Every subject, stream, bucket, KV key and header name of the mesh, built in one place.

A mesh is identified by its prefix (``aimesh`` by default), so several meshes can share one
NATS deployment.  Nothing outside this module spells a subject, stream, KV key or header name:
services ask a :class:`Names` instance (and :class:`Header`, and the key functions below), and
tests build one per test with a unique prefix.

Subject *templates* (``aimesh.infer.{model}.{version}``) are what spans are named after: they
keep span names low-cardinality, as the OpenTelemetry messaging conventions ask.

KV keys do not carry the prefix (the bucket's name does): the ``*_key`` functions below build
them, the ``*_keys`` functions give a family's watch filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from shared.errors import BadRequest

# The NATS micro protocol (ADR-32) lives under a fixed prefix shared by every NATS service.
MICRO_PREFIX: Final = "$SRV"
MICRO_VERBS: Final = ("PING", "INFO", "STATS")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class Header:
    """NATS header names. W3C trace context travels under its own standard names."""

    TRACEPARENT: Final = "traceparent"
    TRACESTATE: Final = "tracestate"
    MSG_ID: Final = "Nats-Msg-Id"
    DEADLINE: Final = "Aimesh-Deadline"  # absolute, milliseconds since the Unix epoch
    BATCH: Final = "Aimesh-Batch"  # a record batch's index within its shard
    VARIANT: Final = "Aimesh-Variant"
    # Error replies use the micro protocol's own headers so standard tooling understands them.
    ERROR: Final = "Nats-Service-Error"
    ERROR_CODE: Final = "Nats-Service-Error-Code"
    # JetStream: store the message only if its subject has no message yet (sequence "0").
    EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
    # On a dead-lettered message (shared.jsactor): why, and where it came from.
    DLQ_REASON: Final = "Aimesh-Dlq-Reason"
    DLQ_CODE: Final = "Aimesh-Dlq-Code"
    DLQ_DELIVERIES: Final = "Aimesh-Dlq-Deliveries"
    DLQ_SUBJECT: Final = "Aimesh-Dlq-Subject"
    DLQ_STREAM: Final = "Aimesh-Dlq-Stream"
    DLQ_SEQUENCE: Final = "Aimesh-Dlq-Sequence"
    # HTTP, at the router's edge.
    REQUEST_ID: Final = "Aimesh-Request-Id"  # the id feedback names (also the OIP response's "id")
    TIMEOUT_MS: Final = "Aimesh-Timeout-Ms"  # a caller's deadline, relative, in milliseconds
    API_KEY: Final = "X-API-Key"  # an API key, when not sent as ``Authorization``


def check_token(value: str, what: str) -> str:
    """Validate one subject token (no dots, wildcards or spaces) and return it."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '-' or '_' (no dots or spaces)")
    return value


def check_name(value: str, what: str) -> str:
    """A name or id from a caller that will be part of a subject or key: a 400 unless a token."""
    try:
        return check_token(value, what)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one mesh, derived from its prefix."""

    prefix: str = "aimesh"

    def __post_init__(self) -> None:
        check_token(self.prefix, "mesh prefix")

    # -- service control -------------------------------------------------------------------
    def micro_name(self, service: str) -> str:
        """The service's name in the micro protocol: unique per mesh on a shared NATS."""
        return f"{self.prefix}-{service}"

    def endpoint(self, service: str, endpoint: str) -> str:
        """A service's own request/reply endpoint: ``<prefix>.<service>.<endpoint>``."""
        return f"{self.prefix}.{service}.{endpoint}"

    def endpoint_template(self, endpoint: str) -> str:
        return f"{self.prefix}.{{service}}.{endpoint}"

    def service_status(self, service: str) -> str:
        """Every service answers its status here (queue group: one instance answers)."""
        return self.endpoint(service, "status")

    def queue_group(self, service: str) -> str:
        return f"{self.prefix}-{service}"

    # -- ingest ------------------------------------------------------------------------------
    @property
    def ingest_submit(self) -> str:
        return f"{self.prefix}.ingest.submit"

    def ingest_events(self, job: str) -> str:
        return f"{self.prefix}.ingest.{job}.events"

    @property
    def ingest_jobs(self) -> str:
        """Accepted ingest jobs, a work queue: a job survives the instance that runs it."""
        return f"{self.prefix}.ingest.jobs"

    @property
    def ingest_jobs_stream(self) -> str:
        return f"{self.prefix.upper()}_INGEST"

    def data_subject(self, dataset: str, version: str, shard: int) -> str:
        return f"{self.prefix}.data.{dataset}.{version}.{shard}"

    def data_version_subjects(self, dataset: str, version: str) -> str:
        return f"{self.prefix}.data.{dataset}.{version}.>"

    @property
    def data_stream(self) -> str:
        return f"{self.prefix.upper()}_DATA"

    @property
    def data_stream_subjects(self) -> str:
        return f"{self.prefix}.data.>"

    # -- training ----------------------------------------------------------------------------
    @property
    def train_submit(self) -> str:
        return f"{self.prefix}.train.submit"

    # -- inference ---------------------------------------------------------------------------
    def infer(self, model: str, version: str) -> str:
        return f"{self.prefix}.infer.{model}.{version}"

    def infer_direct(self, model: str, version: str, instance: str) -> str:
        """One worker's own subject for ``model@version`` (no queue group): a hedge goes to a
        worker known to answer, not to whichever the queue group picks."""
        return f"{self.prefix}.infer.{model}.{version}.{check_token(instance, 'worker instance')}"

    @property
    def infer_direct_subjects(self) -> str:
        return f"{self.prefix}.infer.*.*.*"

    def infer_routed(self, model: str) -> str:
        """Inference without a version: the router applies the model's split or deployment."""
        return f"{self.prefix}.infer.{model}"

    @property
    def infer_routed_subjects(self) -> str:
        return f"{self.prefix}.infer.*"

    def generate(self, model: str, version: str) -> str:
        """Token streaming for language models: one request, a stream of chunks back."""
        return f"{self.prefix}.generate.{model}.{version}"

    def generate_template(self) -> str:
        return f"{self.prefix}.generate.{{model}}.{{version}}"

    def generate_cancel(self, request_id: str) -> str:
        """Stop the generation with this id (the router publishes it when its client is gone);
        not under ``.generate.``, where a model named ``cancel`` could be served."""
        return f"{self.prefix}.cancel.generate.{check_token(request_id, 'generation id')}"

    @property
    def generate_cancel_subjects(self) -> str:
        """Every inference worker listens here (no queue group): any one may run the generation."""
        return f"{self.prefix}.cancel.generate.*"

    def infer_template(self) -> str:
        return f"{self.prefix}.infer.{{model}}.{{version}}"

    @property
    def deploy(self) -> str:
        return f"{self.prefix}.inference.deploy"

    def infer_queue_group(self, model: str, version: str) -> str:
        return f"{self.prefix}-infer-{model}-{version}"

    def durable_request(self, model: str, version: str) -> str:
        return f"{self.prefix}.jobs.{model}.{version}"

    def durable_template(self) -> str:
        return f"{self.prefix}.jobs.{{model}}.{{version}}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}.results.{request_id}"

    @property
    def durable_subjects(self) -> str:
        return f"{self.prefix}.jobs.>"

    @property
    def result_subjects(self) -> str:
        return f"{self.prefix}.results.>"

    @property
    def requests_stream(self) -> str:
        return f"{self.prefix.upper()}_REQUESTS"

    @property
    def results_stream(self) -> str:
        return f"{self.prefix.upper()}_RESULTS"

    # -- experiments, metrics, scaling -------------------------------------------------------
    def feedback(self, model: str) -> str:
        return f"{self.prefix}.feedback.{model}"

    @property
    def feedback_subjects(self) -> str:
        return f"{self.prefix}.feedback.*"

    def exposures(self, model: str) -> str:
        return f"{self.prefix}.events.exposures.{model}"

    def experiment_events(self, model: str) -> str:
        """Promotions and rollbacks, with their evidence."""
        return f"{self.prefix}.events.experiments.{model}"

    @property
    def events_stream(self) -> str:
        """Exposures, feedback and experiment decisions: the experiments' state, replayable."""
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def events_stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.events.>", f"{self.prefix}.feedback.*"]

    def metrics(self, service: str, instance: str) -> str:
        return f"{self.prefix}.metrics.{service}.{instance}"

    @property
    def metrics_subjects(self) -> str:
        return f"{self.prefix}.metrics.*.*"

    @property
    def experiments_query(self) -> str:
        """Ask the metrics service for an experiment's report (ExperimentQuery → ExperimentReport)."""
        return f"{self.prefix}.experiments.show"

    def spans(self, service: str) -> str:
        return f"{self.prefix}.spans.{service}"

    @property
    def spans_subjects(self) -> str:
        return f"{self.prefix}.spans.*"

    def scale(self, pool: str) -> str:
        return f"{self.prefix}.scale.{pool}"

    @property
    def scale_subjects(self) -> str:
        return f"{self.prefix}.scale.*"

    def dead_letter(self, actor: str) -> str:
        """Where a JetStream actor moves a message it gave up on, with the reason in headers."""
        return f"{self.prefix}.dlq.{actor}"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.prefix.upper()}_DLQ"

    # -- buckets -----------------------------------------------------------------------------
    @property
    def datasets_bucket(self) -> str:
        return f"{self.prefix}-datasets"

    @property
    def ingest_bucket(self) -> str:
        """Ingest job records (state, progress, reject report), keyed by job id."""
        return f"{self.prefix}-ingest"

    @property
    def trainers_bucket(self) -> str:
        return f"{self.prefix}-trainers"

    @property
    def jobs_bucket(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def artifacts_bucket(self) -> str:
        return f"{self.prefix}-artifacts"

    @property
    def uploads_bucket(self) -> str:
        """Object store of files sent for ingest by reference (``IngestRequest.object``)."""
        return f"{self.prefix}-uploads"

    @property
    def registry_bucket(self) -> str:
        return f"{self.prefix}-registry"

    @property
    def deployments_bucket(self) -> str:
        return f"{self.prefix}-deployments"

    @property
    def experiments_bucket(self) -> str:
        return f"{self.prefix}-experiments"


# -- KV keys -----------------------------------------------------------------------------------
# Bucket ``<prefix>-jobs``: training jobs (trainer agents, rank 0 of a run, metrics, the CLI).


def job_key(job_id: str) -> str:
    """A TrainJob, the job's control record (compare-and-set)."""
    return f"job.{job_id}"


def job_keys() -> str:
    return "job.*"


def job_key_id(key: str) -> str | None:
    """The job id of a ``job.<id>`` key; None for a key of another family."""
    family, _, job_id = key.partition(".")
    return job_id if family == "job" else None


def progress_key(job_id: str) -> str:
    """A TrainProgress, written by rank 0 while training."""
    return f"progress.{job_id}"


def progress_keys() -> str:
    return "progress.*"


def progress_key_id(key: str) -> str | None:
    """The job id of a ``progress.<id>`` key; None for a key of another family."""
    family, _, job_id = key.partition(".")
    return job_id if family == "progress" else None


def result_key(job_id: str, attempt: int) -> str:
    """A TrainResult: how one attempt of the job ended."""
    return f"result.{job_id}.{attempt}"


def checkpoint_key(job_id: str) -> str:
    """A Checkpoint: where the job's last checkpoint is."""
    return f"checkpoint.{job_id}"


def attempt_key(job_id: str, attempt: int) -> str:
    """Rank 0's account of one attempt (what it trained, its parameters' digests)."""
    return f"attempt.{job_id}.{attempt}"


# Bucket ``<prefix>-ingest``: ingest jobs; bucket ``<prefix>-trainers``: trainer heartbeats (TTL).


def ingest_job_key(job_id: str) -> str:
    """An IngestJob: its state, progress and reject report (the key is the job id itself)."""
    return job_id


def trainer_node_key(instance: str) -> str:
    """A TrainerNode heartbeat (the key is the agent's instance id itself)."""
    return instance


# Bucket ``<prefix>-datasets``: dataset versions (the ingest service writes, everyone reads).


def manifest_key(dataset: str, version: str) -> str:
    """A DatasetManifest, written last: visible means complete."""
    return f"manifest.{dataset}.{version}"


def manifest_key_prefix() -> str:
    """What every manifest key starts with."""
    return "manifest."


def dataset_latest_key(dataset: str) -> str:
    """The newest complete version of ``dataset``."""
    return f"latest.{dataset}"


def dataset_seq_key(dataset: str) -> str:
    """The last version number of ``dataset`` handed out (compare-and-set)."""
    return f"seq.{dataset}"


# Bucket ``<prefix>-registry``: model versions (see shared.registry).


def version_key(model: str, number: str) -> str:
    """A ModelVersion (JSON)."""
    return f"version.{model}.{number}"


def version_key_prefix() -> str:
    """What every version key starts with."""
    return "version."


def alias_key(model: str, alias: str) -> str:
    """A version number; ``latest`` moves on every registration."""
    return f"alias.{model}.{alias}"


def alias_key_prefix(model: str) -> str:
    """What every alias key of ``model`` starts with (the alias follows)."""
    return f"alias.{model}."


def model_seq_key(model: str) -> str:
    """The last version number of ``model`` handed out (compare-and-set)."""
    return f"seq.{model}"


def job_version_key(model: str, job_id: str) -> str:
    """The version number a training job registered (once per job, whatever its attempts)."""
    return f"job.{model}.{job_id}"


# Bucket ``<prefix>-deployments``: what the inference workers serve.


def deploy_key(model: str, ref: str) -> str:
    """A Deployment of ``model`` under ``ref`` (a version number or an alias)."""
    return f"deploy.{model}.{ref}"


def deploy_keys() -> str:
    return "deploy.>"


def is_deploy_key(key: str) -> bool:
    return key.startswith("deploy.")


# Bucket ``<prefix>-experiments``: traffic splits, and the autoscaling leases beside them.


def split_key(model: str) -> str:
    """A Split: the model's traffic split (routers follow ``split.*`` only)."""
    return f"split.{model}"


def split_keys() -> str:
    return "split.*"


def split_key_model(key: str) -> str | None:
    """The model of a ``split.<model>`` key; None for a key of another family."""
    family, _, model = key.partition(".")
    return model if family == "split" else None


def autoscale_lease_key(pool: str) -> str:
    """The lease that lets one metrics instance scale ``pool``."""
    return f"lease.autoscale.{pool}"


def lease_keys() -> str:
    return "lease.>"


def micro_subjects(name: str, instance_id: str) -> list[tuple[str, str]]:
    """The ADR-32 discovery subjects one service instance answers: (verb, subject) pairs.

    Each verb is answered on ``$SRV.VERB``, ``$SRV.VERB.<name>`` and ``$SRV.VERB.<name>.<id>``.
    """
    out: list[tuple[str, str]] = []
    for verb in MICRO_VERBS:
        for subject in (
            f"{MICRO_PREFIX}.{verb}",
            f"{MICRO_PREFIX}.{verb}.{name}",
            f"{MICRO_PREFIX}.{verb}.{name}.{instance_id}",
        ):
            out.append((verb, subject))
    return out


def micro_subject(verb: str, name: str | None = None, instance_id: str | None = None) -> str:
    """The subject a discovery client sends ``verb`` to, optionally narrowed to a service."""
    parts = [MICRO_PREFIX, verb]
    if name:
        parts.append(name)
        if instance_id:
            parts.append(instance_id)
    return ".".join(parts)
