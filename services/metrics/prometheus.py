"""Prometheus text exposition of the mesh's endpoint statistics (pure: no NATS, no asyncio).

Input: the ``$SRV.STATS`` replies of one mesh.  Output: text format 0.0.4.  Series, labelled by
``service``, ``instance`` and ``endpoint``:

- ``aimesh_up`` (gauge): 1 for every instance that answered the last scrape;
- ``aimesh_requests_total``, ``aimesh_errors_total``, ``aimesh_overloaded_total`` (counters);
- ``aimesh_processing_seconds_total`` (counter): handler time summed;
- ``aimesh_in_flight``, ``aimesh_queued`` (gauges);
- ``aimesh_request_duration_seconds`` (histogram, buckets from ``shared.histogram``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.histogram import LATENCY_BOUNDS_S
from shared.schemas import MicroStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HELP = {
    "aimesh_up": ("gauge", "1 when the instance answered the last discovery scrape."),
    "aimesh_requests_total": ("counter", "Messages handled by an endpoint."),
    "aimesh_errors_total": ("counter", "Messages answered with an error (overload included)."),
    "aimesh_overloaded_total": ("counter", "Messages refused because the mailbox was full."),
    "aimesh_processing_seconds_total": ("counter", "Time spent in handlers."),
    "aimesh_in_flight": ("gauge", "Handlers running now."),
    "aimesh_queued": ("gauge", "Messages waiting in the mailbox now."),
    "aimesh_request_duration_seconds": ("histogram", "Handler latency."),
    "aimesh_batches_total": ("counter", "Forward passes of a dynamic batcher, by release reason."),
    "aimesh_batch_rows_total": ("counter", "Rows served by a dynamic batcher's forward passes."),
    "aimesh_batch_size": ("histogram", "Rows per forward pass."),
}
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _batch_series(series: dict[str, list[str]], labels: dict[str, str], data: dict[str, Any]) -> None:
    for reason, count in sorted((data.get("batch_reasons") or {}).items()):
        series["aimesh_batches_total"].append(
            f"aimesh_batches_total{_labels(labels | {'reason': reason})} {int(count)}"
        )
    series["aimesh_batch_rows_total"].append(
        f"aimesh_batch_rows_total{_labels(labels)} {int(data.get('batch_rows', 0))}"
    )
    sizes = {int(k): int(v) for k, v in (data.get("batch_sizes") or {}).items()}
    for bound in _BATCH_BOUNDS:
        cumulative = sum(v for k, v in sizes.items() if k <= bound)
        series["aimesh_batch_size"].append(
            f"aimesh_batch_size_bucket{_labels(labels | {'le': str(bound)})} {cumulative}"
        )
    total = sum(sizes.values())
    rows = sum(k * v for k, v in sizes.items())
    series["aimesh_batch_size"].append(f"aimesh_batch_size_bucket{_labels(labels | {'le': '+Inf'})} {total}")
    series["aimesh_batch_size"].append(f"aimesh_batch_size_count{_labels(labels)} {total}")
    series["aimesh_batch_size"].append(f"aimesh_batch_size_sum{_labels(labels)} {rows}")


def render(snapshots: Sequence[MicroStats]) -> str:
    series: dict[str, list[str]] = {name: [] for name in _HELP}
    for snap in sorted(snapshots, key=lambda s: (s.metadata.get("service", s.name), s.id)):
        service = snap.metadata.get("service", snap.name)
        base = {"service": service, "instance": snap.id}
        series["aimesh_up"].append(f"aimesh_up{_labels(base)} 1")
        for ep in snap.endpoints:
            lab = _labels(base | {"endpoint": ep.name})
            data = ep.data or {}
            series["aimesh_requests_total"].append(f"aimesh_requests_total{lab} {ep.num_requests}")
            series["aimesh_errors_total"].append(f"aimesh_errors_total{lab} {ep.num_errors}")
            series["aimesh_overloaded_total"].append(f"aimesh_overloaded_total{lab} {int(data.get('overloaded', 0))}")
            series["aimesh_processing_seconds_total"].append(
                f"aimesh_processing_seconds_total{lab} {ep.processing_time / 1e9:.9f}"
            )
            series["aimesh_in_flight"].append(f"aimesh_in_flight{lab} {int(data.get('in_flight', 0))}")
            series["aimesh_queued"].append(f"aimesh_queued{lab} {int(data.get('queued', 0))}")
            buckets = data.get("latency_buckets") or []
            if len(buckets) == len(LATENCY_BOUNDS_S) + 1:
                hist = series["aimesh_request_duration_seconds"]
                for bound, count in zip((*LATENCY_BOUNDS_S, "+Inf"), buckets, strict=True):
                    le = _labels(base | {"endpoint": ep.name, "le": bound if isinstance(bound, str) else repr(bound)})
                    hist.append(f"aimesh_request_duration_seconds_bucket{le} {count}")
                hist.append(f"aimesh_request_duration_seconds_count{lab} {buckets[-1]}")
                hist.append(f"aimesh_request_duration_seconds_sum{lab} {ep.processing_time / 1e9:.9f}")
            if "batches" in data:
                _batch_series(series, base | {"endpoint": ep.name}, data)
    out: list[str] = []
    for name, (kind, text) in _HELP.items():
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(series[name])
    return "\n".join(out) + "\n"
