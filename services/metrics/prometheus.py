"""Prometheus text exposition (format 0.0.4) of what the metrics service knows (pure).

Input: a :class:`MeshView`: the latest metric snapshot of every live instance, queue lag per
durable consumer, training progress, experiment reports and the autoscaler's state.  Series
(docs/metrics.md lists them with their labels):

- per instance: ``aimesh_up``, ``aimesh_process_cpu_seconds_total``,
  ``aimesh_process_resident_memory_bytes``, ``aimesh_gpu_utilization_ratio``,
  ``aimesh_gpu_memory_used_bytes``;
- per endpoint (labels service, instance, endpoint, and model/version where the actor has
  them): ``aimesh_requests_total``, ``aimesh_errors_total``, ``aimesh_overloaded_total``,
  ``aimesh_unavailable_total``, ``aimesh_processing_seconds_total``, ``aimesh_in_flight``, ``aimesh_queued``,
  ``aimesh_request_duration_seconds`` (histogram) and the batching series;
- per gateway route (instance, model, version): ``aimesh_gateway_requests_total``,
  ``aimesh_gateway_errors_total`` (by code), ``aimesh_gateway_request_duration_seconds``;
- ``aimesh_queue_lag`` / ``_pending`` / ``_ack_pending`` per stream and consumer;
- ``aimesh_train_loss``, ``aimesh_train_samples_per_second``, ``aimesh_train_step`` per job;
- ``aimesh_experiment_*`` per model and variant; ``aimesh_replicas`` / ``_desired`` per pool;
- ``aimesh_rejected_total`` by kind (malformed snapshots, feedback, spans).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.histogram import LATENCY_BOUNDS_S
from shared.schemas import ExperimentReport, MetricsSnapshot, ScaleDecision

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HELP = {
    "aimesh_up": ("gauge", "1 for every instance whose last metric snapshot is fresh."),
    "aimesh_process_cpu_seconds_total": ("counter", "User and system CPU time of the process."),
    "aimesh_process_resident_memory_bytes": ("gauge", "Resident memory of the process."),
    "aimesh_gpu_utilization_ratio": ("gauge", "GPU utilisation, 0 to 1 (absent without NVML)."),
    "aimesh_gpu_memory_used_bytes": ("gauge", "GPU memory in use on the device."),
    "aimesh_requests_total": ("counter", "Messages handled by an endpoint."),
    "aimesh_errors_total": ("counter", "Messages answered with an error (overload included)."),
    "aimesh_overloaded_total": ("counter", "Messages refused because the mailbox was full."),
    "aimesh_unavailable_total": ("counter", "Messages answered 503: what the handler needs cannot serve now."),
    "aimesh_processing_seconds_total": ("counter", "Time spent in handlers."),
    "aimesh_in_flight": ("gauge", "Handlers running now."),
    "aimesh_queued": ("gauge", "Messages waiting in the mailbox now."),
    "aimesh_request_duration_seconds": ("histogram", "Handler latency."),
    "aimesh_batches_total": ("counter", "Forward passes of a dynamic batcher, by release reason."),
    "aimesh_batch_rows_total": ("counter", "Rows served by a dynamic batcher's forward passes."),
    "aimesh_batch_size": ("histogram", "Rows per forward pass."),
    "aimesh_gateway_requests_total": ("counter", "Inference requests through the gateway, by served version."),
    "aimesh_gateway_errors_total": ("counter", "Gateway inference requests that ended in an error, by code."),
    "aimesh_gateway_request_duration_seconds": ("histogram", "Gateway inference latency (NATS round trip)."),
    "aimesh_gateway_hedged_total": ("counter", "Gateway inferences sent again because the answer was late."),
    "aimesh_gateway_hedges_won_total": ("counter", "Hedged gateway inferences the second request answered first."),
    "aimesh_queue_lag": ("gauge", "Durable messages not yet acknowledged: pending + ack pending."),
    "aimesh_queue_pending": ("gauge", "Durable messages not yet delivered to the consumer."),
    "aimesh_queue_ack_pending": ("gauge", "Durable messages delivered, not yet acknowledged."),
    "aimesh_train_loss": ("gauge", "Latest training loss of a job."),
    "aimesh_train_samples_per_second": ("gauge", "Training throughput of a job, all ranks."),
    "aimesh_train_step": ("gauge", "Global step of a job."),
    "aimesh_experiment_requests": ("gauge", "Requests served by a variant in the model's experiment."),
    "aimesh_experiment_error_rate": ("gauge", "Share of a variant's requests that ended in an error."),
    "aimesh_experiment_rewards": ("gauge", "Outcomes received for a variant."),
    "aimesh_experiment_reward_mean": ("gauge", "Mean reward of a variant."),
    "aimesh_experiment_p_value": ("gauge", "Always-valid p-value of the variant against the control."),
    "aimesh_replicas": ("gauge", "Live instances of a scaled pool."),
    "aimesh_replicas_desired": ("gauge", "The autoscaler's target for a pool."),
    "aimesh_rejected_total": ("counter", "Malformed messages the metrics service rejected, by kind."),
}
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QueueLag:
    stream: str
    consumer: str
    pending: int
    ack_pending: int


@dataclass(frozen=True)
class TrainingFigures:
    job: str
    model: str
    loss: float
    samples_per_s: float
    step: int


@dataclass
class MeshView:
    snapshots: Sequence[MetricsSnapshot] = ()
    lags: Sequence[QueueLag] = ()
    training: Sequence[TrainingFigures] = ()
    experiments: Sequence[ExperimentReport] = ()
    replicas: Mapping[str, int] = field(default_factory=dict)
    scale: Mapping[str, ScaleDecision] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Out:
    def __init__(self) -> None:
        self.series: dict[str, list[str]] = {name: [] for name in _HELP}

    def add(self, family: str, labels: Mapping[str, str], value: float, suffix: str = "") -> None:
        self.series[family].append(f"{family}{suffix}{_labels(labels)} {_num(value)}")

    def histogram(
        self, family: str, labels: Mapping[str, str], cumulative: Sequence[int], bounds: Sequence[float], total: float
    ) -> None:
        for bound, count in zip((*[repr(float(b)) for b in bounds], "+Inf"), cumulative, strict=True):
            self.add(family, {**labels, "le": bound}, count, "_bucket")
        self.add(family, labels, cumulative[-1], "_count")
        self.add(family, labels, total, "_sum")

    def text(self) -> str:
        out: list[str] = []
        for name, (kind, text) in _HELP.items():
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(self.series[name])
        return "\n".join(out) + "\n"


def _batch_series(out: _Out, labels: dict[str, str], data: Mapping[str, Any]) -> None:
    for reason, count in sorted((data.get("batch_reasons") or {}).items()):
        out.add("aimesh_batches_total", {**labels, "reason": reason}, int(count))
    out.add("aimesh_batch_rows_total", labels, int(data.get("batch_rows", 0)))
    sizes = {int(k): int(v) for k, v in (data.get("batch_sizes") or {}).items()}
    cumulative = [sum(v for k, v in sizes.items() if k <= bound) for bound in _BATCH_BOUNDS]
    cumulative.append(sum(sizes.values()))
    rows = sum(k * v for k, v in sizes.items())
    for bound, count in zip((*map(str, _BATCH_BOUNDS), "+Inf"), cumulative, strict=True):
        out.add("aimesh_batch_size", {**labels, "le": bound}, count, "_bucket")
    out.add("aimesh_batch_size", labels, cumulative[-1], "_count")
    out.add("aimesh_batch_size", labels, rows, "_sum")


def _instance(out: _Out, snap: MetricsSnapshot) -> None:
    base = {"service": snap.service, "instance": snap.instance}
    out.add("aimesh_up", base, 1)
    out.add("aimesh_process_cpu_seconds_total", base, snap.process.cpu_s)
    out.add("aimesh_process_resident_memory_bytes", base, snap.process.rss_bytes)
    for gpu in snap.gpus:
        labels = {**base, "gpu": str(gpu.index)}
        if gpu.utilization >= 0:
            out.add("aimesh_gpu_utilization_ratio", labels, gpu.utilization)
        out.add("aimesh_gpu_memory_used_bytes", labels, gpu.memory_used_bytes)
    for actor in snap.actors:
        labels = {**base, "endpoint": actor.name, **actor.labels}
        out.add("aimesh_requests_total", labels, actor.requests)
        out.add("aimesh_errors_total", labels, actor.errors)
        out.add("aimesh_overloaded_total", labels, actor.overloaded)
        out.add("aimesh_unavailable_total", labels, actor.unavailable)
        out.add("aimesh_processing_seconds_total", labels, actor.processing_time_ns / 1e9)
        out.add("aimesh_in_flight", labels, actor.in_flight)
        out.add("aimesh_queued", labels, actor.queued)
        if len(actor.latency_buckets) == len(LATENCY_BOUNDS_S) + 1:
            out.histogram(
                "aimesh_request_duration_seconds",
                labels,
                actor.latency_buckets,
                LATENCY_BOUNDS_S,
                actor.processing_time_ns / 1e9,
            )
        if "batches" in actor.extra:
            _batch_series(out, labels, actor.extra)
    for route in snap.routes:
        labels = {"instance": snap.instance, "model": route.model, "version": route.version}
        out.add("aimesh_gateway_requests_total", labels, route.requests)
        out.add("aimesh_gateway_hedged_total", labels, route.hedged)
        out.add("aimesh_gateway_hedges_won_total", labels, route.hedges_won)
        for code, count in sorted(route.errors.items()):
            out.add("aimesh_gateway_errors_total", {**labels, "code": code}, count)
        if len(route.latency_buckets) == len(LATENCY_BOUNDS_S) + 1:
            out.histogram(
                "aimesh_gateway_request_duration_seconds",
                labels,
                route.latency_buckets,
                LATENCY_BOUNDS_S,
                route.latency_sum_s,
            )


def render(view: MeshView) -> str:
    out = _Out()
    for snap in sorted(view.snapshots, key=lambda s: (s.service, s.instance)):
        _instance(out, snap)
    for lag in view.lags:
        labels = {"stream": lag.stream, "consumer": lag.consumer}
        out.add("aimesh_queue_lag", labels, lag.pending + lag.ack_pending)
        out.add("aimesh_queue_pending", labels, lag.pending)
        out.add("aimesh_queue_ack_pending", labels, lag.ack_pending)
    for job in view.training:
        labels = {"job": job.job, "model": job.model}
        out.add("aimesh_train_loss", labels, job.loss)
        out.add("aimesh_train_samples_per_second", labels, job.samples_per_s)
        out.add("aimesh_train_step", labels, job.step)
    for report in view.experiments:
        for v in report.variants:
            labels = {"model": report.model, "variant": v.version}
            out.add("aimesh_experiment_requests", labels, v.requests)
            out.add("aimesh_experiment_error_rate", labels, v.error_rate)
            out.add("aimesh_experiment_rewards", labels, v.rewards)
            out.add("aimesh_experiment_reward_mean", labels, v.reward_mean)
            out.add("aimesh_experiment_p_value", labels, v.p_value)
    for pool, count in sorted(view.replicas.items()):
        out.add("aimesh_replicas", {"pool": pool}, count)
    for pool, decision in sorted(view.scale.items()):
        out.add("aimesh_replicas_desired", {"pool": pool}, decision.desired)
    for kind, count in sorted(view.rejected.items()):
        out.add("aimesh_rejected_total", {"kind": kind}, count)
    return out.text()
