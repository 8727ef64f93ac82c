"""Every wire schema of the mesh.

Mesh messages are ``msgspec.Struct`` (frozen, keyword-only) encoded as MessagePack.  Rules for
evolving them (see docs/architecture.md): new fields get defaults, a field's type never changes,
payloads a service only forwards stay ``msgspec.Raw``.

The NATS micro protocol (ADR-32) replies are JSON with the exact field names of the standard,
so ``nats micro`` and every client library's service API read them.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

import msgspec

DEFAULT_MAX_BATCH_SIZE: Final = 32  # rows per forward pass, unless a deployment says otherwise


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every mesh message (MessagePack on the wire)."""


# -- closed sets of values ---------------------------------------------------------------------
# On the wire they are the same strings as before; decoding any other value is a
# msgspec.ValidationError (a 400 at an actor, a skipped record at a watcher).

IngestState = Literal["queued", "running", "complete", "failed"]
TrainState = Literal["forming", "starting", "running", "complete", "failed"]
NodeState = Literal["idle", "busy"]
Parallel = Literal["dp", "pp"]
Optimizer = Literal["adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
ModelTask = Literal["classify", "lm"]
TokenizerKind = Literal["bytes"]
SplitState = Literal["running", "promoted", "rolled_back"]
ExperimentState = Literal["running", "promoted", "rolled_back", "none"]  # "none": no experiment
Verdict = Literal["waiting", "promote", "rollback", "promoted", "rolled_back"]
DecisionAction = Literal["promote", "rollback"]
DurableState = Literal["pending", "done", "error"]
FinishReason = Literal["stop", "length", "cancelled"]
SpanKindName = Literal["SERVER", "CLIENT", "PRODUCER", "CONSUMER", "INTERNAL"]

OPTIMIZERS: Final[tuple[Optimizer, ...]] = get_args(Optimizer)
DEVICES: Final[tuple[Device, ...]] = get_args(Device)

# A dataset's sharding: "round_robin" or "hash:<column>" (a column name is free-form).
Sharding = Annotated[str, msgspec.Meta(pattern=r"^(?:round_robin|hash:[\s\S]+)$")]


# -- service control ---------------------------------------------------------------------------


class StatusRequest(Message, frozen=True, kw_only=True):
    """Ask one instance of a service for its status (the reply is a ServiceStatus)."""


class ActorStats(Message, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str | None
    requests: int
    errors: int
    overloaded: int
    in_flight: int
    queued: int
    max_concurrency: int
    mailbox_size: int
    processing_time_ns: int
    last_error: str = ""
    unavailable: int = 0  # errors that were 503s: what the handler needs cannot serve now
    # Cumulative counts per bound of shared.histogram.LATENCY_BOUNDS_S, then +Inf.
    latency_buckets: list[int] = []
    extra: dict[str, Any] = {}  # what the actor's owner adds (e.g. batching counters)
    labels: dict[str, str] = {}  # e.g. model and version, for metrics series


class ServiceStatus(Message, frozen=True, kw_only=True):
    name: str
    instance_id: str
    version: str
    state: str  # free-form: a ServiceState value, or why a ready service is not ready
    pid: int
    host: str
    started_at: str  # RFC 3339
    uptime_s: float
    actors: list[ActorStats]
    failing_tasks: dict[str, str] = {}  # owned background tasks that keep failing → last error


# -- tensors -----------------------------------------------------------------------------------


class Tensor(Message, frozen=True, kw_only=True):
    """A dense tensor: dtype name (numpy spelling), shape, little-endian C-order bytes."""

    dtype: str
    shape: list[int]
    data: bytes


# -- datasets --------------------------------------------------------------------------------------


class ColumnSpec(Message, frozen=True, kw_only=True):
    """One column: numpy dtype name (or "str"), and the shape of one record's value."""

    name: str
    dtype: str
    shape: list[int] = []


class Column(Message, frozen=True, kw_only=True):
    """A column of a record batch: ``count × shape`` values, little-endian C order; for dtype
    "str", ``data`` is a MessagePack array of strings."""

    name: str
    dtype: str
    shape: list[int] = []
    data: bytes


class RecordBatch(Message, frozen=True, kw_only=True):
    """What one message of the data stream carries: ``count`` records of one shard."""

    dataset: str
    version: str
    shard: int
    batch: int
    offset: int  # index, within the shard, of the first record
    count: int
    columns: list[Column]


class ShardInfo(Message, frozen=True, kw_only=True):
    index: int
    subject: str
    records: int
    batches: int
    bytes: int
    sha256: str  # over the batches' message bodies, in batch order


class TokenizerSpec(Message, frozen=True, kw_only=True):
    """How text became token ids: ``bytes`` = UTF-8 bytes 0–255, documents ended by ``eos_id``."""

    kind: TokenizerKind
    vocab_size: int
    eos_id: int
    seq_len: int  # tokens per record are seq_len + 1 (inputs and shifted targets)


class DatasetManifest(Message, frozen=True, kw_only=True):
    """A complete dataset version; written last, so a visible manifest means complete data."""

    dataset: str
    version: str
    format: str
    columns: list[ColumnSpec]  # as stored: x (features), y (label), tokens (text), others by name
    features: list[str] = []  # the input columns packed, in order, into x
    label: str | None = None  # the input column whose values are stored as y
    label_classes: list[str] = []  # when labels were strings: their index order
    classes: int = 0  # class labels: how many classes (the largest id + 1)
    sharding: Sharding
    shards: list[ShardInfo]
    records: int
    rejected: int
    bytes: int
    created_at: str
    sources: list[str]
    fingerprint: str
    job_id: str
    tokenizer: TokenizerSpec | None = None
    trace_id: str = ""  # the ingest job's trace (lineage)


class IngestRequest(Message, frozen=True, kw_only=True):
    # The input: either ``paths`` (files or folders, as the ingest service sees them; read only
    # under its configured roots) or ``object``, the name of a file uploaded to the uploads object
    # store (``<prefix>-uploads``).  Exactly one of them.
    paths: list[str] = []
    object: str | None = None
    dataset: str
    # csv | jsonl | npy | npz | text; inferred from the extension.  A str, not a Literal: the
    # ingest service refuses another value with its own message ("unknown format 'xml'").
    format: str | None = None
    shards: int = 4
    label: str | None = None
    shard_by: str | None = None  # hash of this column instead of round-robin
    schema: list[ColumnSpec] | None = None
    max_reject_ratio: float = 0.01
    seq_len: int = 128  # text: tokens per training sequence
    max_text_bytes: int = 1 << 20  # text: longer values or files are rejected
    batch_bytes: int = 512 * 1024  # target size of one record batch message


class RejectedRow(Message, frozen=True, kw_only=True):
    source: str
    line: int  # 1-based line (CSV, JSONL), record index (npy/npz) or 0 (a whole text file)
    column: str | None = None
    reason: str


class IngestJob(Message, frozen=True, kw_only=True):
    """A job's record in the ingest bucket, also published on its events subject."""

    job_id: str
    dataset: str
    version: str
    fingerprint: str
    request: IngestRequest
    state: IngestState
    records: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    batches: int = 0
    rejects: list[RejectedRow] = []  # the first ones; ``rejected`` counts all
    error: str = ""
    attempts: int = 0
    created_at: str = ""
    updated_at: str = ""
    elapsed_s: float = 0.0


class IngestJobRef(Message, frozen=True, kw_only=True):
    """A message on the ingest work queue: run (or resume) this job."""

    job_id: str


class IngestAccepted(Message, frozen=True, kw_only=True):
    job_id: str
    dataset: str
    version: str
    state: IngestState
    events: str


# -- training ---------------------------------------------------------------------------------------


class TrainRequest(Message, frozen=True, kw_only=True):
    model: str  # the registry name of the result, e.g. "digits"
    factory: str  # package.module:function returning a torch.nn.Module
    kwargs: dict[str, Any] = {}  # the factory's keyword arguments
    dataset: str  # NAME[@VERSION]
    nodes: int = 1
    min_nodes: int | None = None  # re-form with at least this many after a loss (default: nodes)
    parallel: Parallel = "dp"
    epochs: int = 1
    batch_size: int = 64  # global, across ranks
    lr: float = 1e-3
    # Optimizer (OPTIMIZERS) and Device (DEVICES), checked at submission; str, not Literal, because
    # job records (TrainJob.request) stored before that check may hold another value (such a job
    # trained with adam, on the cpu), and they must still decode.
    optimizer: str = "adam"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only)
    checkpoint_interval_s: float = 30.0  # epoch-end checkpoints at most this often (the last one always)
    max_restarts: int = 3
    wait_nodes_s: float = 60.0
    microbatches: int = 4  # pp
    eval_fraction: float = 0.1  # records held out for evaluation
    max_steps: int | None = None  # stop early (tests, benchmarks)
    collective_timeout_s: float = 30.0
    resume: str | None = None  # a failed job's id: run it again from its last checkpoint
    # The client's idempotency key: the job's id is ``<model>-<submission_id>``, so a resend of the
    # same submission (after a 503 or a lost reply) answers the job the first one created.
    submission_id: str | None = None


class TrainJob(Message, frozen=True, kw_only=True):
    """A training job's control record (bucket ``<prefix>-jobs``, key ``job.<id>``), changed only
    with compare-and-set by the trainer agents."""

    job_id: str
    request: TrainRequest
    state: TrainState
    attempt: int = 1
    world: int = 0  # the size this attempt runs with
    members: list[str] = []  # agent instance ids; the index is the rank
    master: str = ""  # host:port of rank 0's TCPStore
    forming_deadline: float = 0.0  # epoch seconds
    restarts: int = 0
    error: str = ""
    model_version: str = ""
    metrics: dict[str, float] = {}
    created_at: str = ""
    updated_at: str = ""
    trace_id: str = ""


class TrainProgress(Message, frozen=True, kw_only=True):
    """Written by rank 0 while training (key ``progress.<job>``)."""

    job_id: str
    attempt: int
    world: int
    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    samples_per_s: float
    checkpoint_step: int = -1
    ranks: list[int] = []


class TrainResult(Message, frozen=True, kw_only=True):
    """Written by rank 0 when training ends (key ``result.<job>.<attempt>``)."""

    job_id: str
    ok: bool
    error: str = ""
    model_version: str = ""
    metrics: dict[str, float] = {}
    losses: list[float] = []  # the global mean loss of the first steps, in order


class TrainerNode(Message, frozen=True, kw_only=True):
    """A trainer agent's heartbeat (bucket ``<prefix>-trainers``, TTL)."""

    instance: str
    host: str
    address: str  # where rank 0 would listen, if this node gets it
    pid: int
    state: NodeState
    job: str = ""
    device: str = "cpu"  # free-form: "cpu", "cuda×<count>"


class TrainAccepted(Message, frozen=True, kw_only=True):
    job_id: str
    state: TrainState
    nodes_available: int


class Checkpoint(Message, frozen=True, kw_only=True):
    """Where the last checkpoint is (key ``checkpoint.<job>``)."""

    job_id: str
    attempt: int
    step: int
    epoch: int
    offset: int  # samples into the epoch, globally
    objects: list[str]  # object names: one (dp) or one per stage (pp)
    world: int


class ChatTemplate(Message, frozen=True, kw_only=True):
    """How chat messages become one prompt, declared by the model (``zoo.lm``) and recorded with
    its version.  Plain data, never code: ``{role}`` and ``{content}`` in ``turn`` are replaced
    with ``str.replace`` (no ``str.format``, no Jinja, which can reach attributes)."""

    turn: str  # one message, e.g. "<|{role}|>\n{content}\n"
    generation_prompt: str  # after the last message: where the assistant's turn begins
    # The roles a message may have.
    roles: list[str] = msgspec.field(default_factory=lambda: ["system", "user", "assistant"])
    stop: list[str] = []  # sequences that end the assistant's turn (added to the request's stop)


class ModelVersion(Message, frozen=True, kw_only=True):
    """A registered model version (bucket ``<prefix>-registry``, key ``version.<model>.<n>``)."""

    model: str
    version: str
    artifact: str  # object name in the artifacts store (safetensors)
    factory: str
    kwargs: dict[str, Any] = {}
    task: ModelTask
    inputs: list[ColumnSpec] = []
    metrics: dict[str, float] = {}
    dataset: str  # NAME@VERSION it was trained on
    dataset_trace_id: str = ""
    hyperparameters: dict[str, Any] = {}
    job_id: str = ""
    trace_id: str = ""  # the training run's trace (lineage)
    created_at: str = ""
    label_classes: list[str] = []
    tokenizer: TokenizerSpec | None = None
    chat_template: ChatTemplate | None = None  # a language model's, when its factory declares one


# -- serving ----------------------------------------------------------------------------------------


class DeployRequest(Message, frozen=True, kw_only=True):
    model: str
    ref: str = "latest"  # a version number or an alias
    replicas: int = 1  # a target for the autoscaler and `aimesh up`; every inference worker serves it
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = 2.0  # under sustained load, how long a batch may wait to fill up


class Deployment(Message, frozen=True, kw_only=True):
    """What the inference workers serve (bucket ``<prefix>-deployments``, key ``deploy.<model>``)."""

    model: str
    ref: str
    version: str  # resolved at deploy time
    previous: str = ""  # the version this ref pointed at before: callers fall back to it while this one loads
    replicas: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = 2.0
    updated_at: str = ""


class Variant(Message, frozen=True, kw_only=True):
    version: str
    weight: float


class Mirror(Message, frozen=True, kw_only=True):
    version: str
    percent: float  # of requests copied; replies discarded


class Guardrails(Message, frozen=True, kw_only=True):
    """What an experiment's candidates must keep to, and when the metrics service may act.

    A candidate that breaks ``max_error_rate`` or ``max_p99_ms`` (once it has served
    ``min_requests``) is rolled back; one whose reward beats the control's in the sequential test
    by at least ``min_reward_lift`` (absolute, in reward units) is promoted.  No verdict on
    rewards before every variant has ``min_samples`` of them."""

    max_error_rate: float | None = None  # share of requests answered with an error
    max_p99_ms: float | None = None
    min_reward_lift: float = 0.0
    min_samples: int = 200  # rewards per variant before the sequential test may decide
    min_requests: int = 50  # requests per variant before error and latency guardrails apply
    alpha: float = 0.05  # the sequential test's error bound (always valid under peeking)
    auto: bool = True  # write the verdict to the split (promote / roll back), or only report it


class Split(Message, frozen=True, kw_only=True):
    """A model's traffic split (bucket ``<prefix>-experiments``, key ``split.<model>``).

    With ``guardrails`` set it is an experiment: ``control`` (default: the first variant) is
    compared with every other variant, and the metrics service moves ``state`` from
    ``running`` to ``promoted`` or ``rolled_back`` (rewriting ``variants``) when it decides."""

    model: str
    variants: list[Variant]
    sticky: str | None = None  # an HTTP header / NATS header whose value pins a caller to a variant
    mirrors: list[Mirror] = []
    updated_at: str = ""
    control: str = ""
    guardrails: Guardrails | None = None
    state: SplitState = "running"
    experiment: str = ""  # id, new whenever a user writes the split; statistics are kept per id
    decided_at: str = ""

    @property
    def control_version(self) -> str:
        return self.control or (self.variants[0].version if self.variants else "")


class InferRequest(Message, frozen=True, kw_only=True):
    """One request: named input tensors whose first dimension is the batch (usually 1)."""

    inputs: dict[str, Tensor]
    id: str = ""


class InferReply(Message, frozen=True, kw_only=True):
    outputs: dict[str, Tensor]
    model: str
    version: str
    id: str = ""
    batch_size: int = 1  # how many requests' rows shared the forward pass that served this one
    worker: str = ""  # the instance id of the worker that answered (a hedge may go to it directly)


class DurableResult(Message, frozen=True, kw_only=True):
    """The outcome of a durable request (stream ``<PREFIX>_RESULTS``, subject
    ``<prefix>.results.<id>``; the latest message of the subject is the answer)."""

    id: str
    state: DurableState
    model: str = ""
    version: str = ""
    outputs: dict[str, Tensor] = {}
    error: str = ""
    code: int = 0


class GenerateRequest(Message, frozen=True, kw_only=True):
    """Text generation; the reply is a stream of GenerateChunk messages, the last one ``done``."""

    prompt: str
    max_tokens: int = 64
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = []
    seed: int | None = None
    id: str = ""  # names the generation: ``<prefix>.cancel.generate.<id>`` stops it


class GenerateChunk(Message, frozen=True, kw_only=True):
    text: str  # the new text since the previous chunk
    index: int  # chunk number, from 0
    done: bool = False
    finish_reason: FinishReason | None = None  # on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    version: str = ""


# -- experiments: exposures, outcomes, decisions ------------------------------------------------


class Exposure(Message, frozen=True, kw_only=True):
    """One request served under an experiment: which variant, how fast, how it ended."""

    id: str  # the request id (what feedback names)
    model: str
    variant: str
    experiment: str
    latency_s: float
    code: int = 200  # the HTTP-style status the caller got
    ts: float  # epoch seconds


class ExposureBatch(Message, frozen=True, kw_only=True):
    """What a router publishes (subject ``<prefix>.events.exposures.<model>``): exposures are
    batched so an experiment costs one JetStream publish per batch, not per request."""

    router: str
    exposures: list[Exposure]


class Feedback(Message, frozen=True, kw_only=True):
    """An outcome for a served request (``<prefix>.feedback.<model>``, MessagePack or JSON)."""

    id: str  # the request id the outcome belongs to
    reward: float = 1.0  # a reward, or a conversion as 1 / 0
    model: str = ""  # taken from the subject when empty
    variant: str = ""  # known from the request's exposure when empty
    ts: float = 0.0


class VariantReport(Message, frozen=True, kw_only=True):
    version: str
    weight: float = 0.0
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    rewards: int = 0  # outcomes received
    reward_mean: float = 0.0
    reward_ci_low: float = 0.0  # 95% confidence interval of the mean reward
    reward_ci_high: float = 0.0
    lift: float = 0.0  # reward_mean − the control's
    p_value: float = 1.0  # always-valid p-value of "no difference from the control" (1 for the control)
    guardrail: str = ""  # which guardrail it breaks, if any


class ExperimentReport(Message, frozen=True, kw_only=True):
    model: str
    experiment: str
    state: ExperimentState
    control: str
    variants: list[VariantReport]
    verdict: Verdict
    reason: str
    winner: str = ""
    min_samples: int = 0
    alpha: float = 0.05
    updated_at: float = 0.0


class ExperimentDecision(Message, frozen=True, kw_only=True):
    """A promotion or rollback, with its evidence (``<prefix>.events.experiments.<model>``)."""

    model: str
    experiment: str
    action: DecisionAction
    version: str  # the version that now takes all traffic
    candidate: str  # the version the decision is about
    reason: str
    evidence: ExperimentReport
    ts: float


class ExperimentQuery(Message, frozen=True, kw_only=True):
    model: str


# -- metrics and scaling ---------------------------------------------------------------------------


class ProcessStats(Message, frozen=True, kw_only=True):
    cpu_s: float  # user + system CPU seconds since the process started
    rss_bytes: int
    threads: int = 0


class GpuStats(Message, frozen=True, kw_only=True):
    index: int
    name: str = ""
    utilization: float = -1.0  # 0–1; −1 when unknown (no NVML)
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0


class RouteStats(Message, frozen=True, kw_only=True):
    """The router's counters per model and served version (the variant)."""

    model: str
    version: str
    requests: int = 0
    errors: dict[str, int] = {}  # by status code
    latency_buckets: list[int] = []  # cumulative, per shared.histogram.LATENCY_BOUNDS_S then +Inf
    latency_sum_s: float = 0.0
    hedged: int = 0  # requests sent again because the answer was late (shared/hedge.py)
    hedges_won: int = 0  # of those, answered first by the second request


class MetricsSnapshot(Message, frozen=True, kw_only=True):
    """What every service publishes every ``metrics_interval_s`` (``<prefix>.metrics.<service>.<instance>``)."""

    service: str
    instance: str
    host: str
    pid: int
    ts: float
    interval_s: float
    state: str = "ready"  # free-form, as ServiceStatus.state
    process: ProcessStats
    gpus: list[GpuStats] = []
    actors: list[ActorStats] = []
    routes: list[RouteStats] = []


class ScaleDecision(Message, frozen=True, kw_only=True):
    """The autoscaler's target for a pool (``<prefix>.scale.<pool>``)."""

    pool: str
    desired: int
    current: int
    reason: str
    ts: float
    by: str = ""  # the metrics instance that holds the pool's autoscaling lease


class SpanRecord(Message, frozen=True, kw_only=True):
    trace_id: str  # 32 hex digits
    span_id: str
    parent_id: str = ""
    name: str
    kind: SpanKindName
    service: str
    start_ns: int
    end_ns: int
    error: bool = False
    attributes: dict[str, str] = {}


class SpanBatch(Message, frozen=True, kw_only=True):
    """Finished spans a service sends to the metrics service (``<prefix>.spans.<service>``)."""

    service: str
    instance: str
    spans: list[SpanRecord]


# -- NATS micro protocol (JSON, ADR-32) -----------------------------------------------------------

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


class MicroEndpointInfo(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    queue_group: str = ""
    metadata: dict[str, str] = {}


class MicroEndpointStats(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    queue_group: str = ""
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, summed
    average_processing_time: int = 0  # nanoseconds
    data: dict[str, Any] | None = None


class MicroPing(msgspec.Struct, kw_only=True):
    type: str = PING_TYPE
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}


class MicroInfo(msgspec.Struct, kw_only=True):
    type: str = INFO_TYPE
    name: str
    id: str
    version: str
    description: str = ""
    metadata: dict[str, str] = {}
    endpoints: list[MicroEndpointInfo] = []


class MicroStats(msgspec.Struct, kw_only=True):
    type: str = STATS_TYPE
    name: str
    id: str
    version: str
    started: str  # RFC 3339, UTC
    metadata: dict[str, str] = {}
    endpoints: list[MicroEndpointStats] = []
