"""The metrics service's TraceStore: traces assembled from span batches, newest first, bounded
(services/metrics/traces.py)."""

from __future__ import annotations

import pytest

from services.metrics.traces import TraceStore
from shared.schemas import SpanBatch
from tests.dashboard_data import request_trace


def test_trace_store_assembles_a_trace_from_batches_in_any_order() -> None:
    store = TraceStore()
    spans = request_trace("ab" * 16, 1_000_000)
    router, inference = spans[:2], spans[2:]
    # The inference worker's batch lands first: its top span's parent is not here yet.
    store.add(SpanBatch(service="inference", instance="i1", spans=list(reversed(inference))))
    (partial,) = store.recent()
    assert partial["root"] == "process aimesh.infer.{model}.{version}"
    assert partial["spans"] == 3
    store.add(SpanBatch(service="router", instance="r1", spans=router))
    store.add(SpanBatch(service="router", instance="r1", spans=router))  # delivered twice: counted once
    (summary,) = store.recent()
    assert summary == {
        "trace_id": "ab" * 16,
        "root": "POST /v2/models/{model}/infer",
        "service": "router",
        "start_ns": spans[0].start_ns,
        "duration_ms": pytest.approx(9.5),
        "spans": 5,
        "error": False,
    }
    assert [s.span_id for s in store.get("AB" * 16)] == [s.span_id for s in spans]
    assert store.get("cd" * 16) == []


def test_trace_store_lists_newest_first_and_evicts_the_oldest() -> None:
    store = TraceStore(max_traces=3)
    for i in range(5):
        store.add(SpanBatch(service="router", instance="r1", spans=request_trace(f"{i:032x}", i * 10**9, error=i == 4)))
    recent = store.recent()
    assert [t["trace_id"] for t in recent] == [f"{i:032x}" for i in (4, 3, 2)]
    assert recent[0]["error"] is True and recent[1]["error"] is False
    assert store.evicted_traces == 2
    assert store.get(f"{0:032x}") == []
    assert len(store.recent(limit=2)) == 2


def test_trace_store_caps_spans_per_trace() -> None:
    store = TraceStore(max_spans_per_trace=3)
    store.add(SpanBatch(service="router", instance="r1", spans=request_trace("ef" * 16, 0)))
    assert len(store.get("ef" * 16)) == 3
    assert store.dropped_spans == 2
