"""Recent traces for the dashboard, assembled from the span batches services publish.

The spans of one trace come from several services, each flushing its own batches about once a
second, so they arrive in several batches and in any order: a child before its parent is usual.
A trace is therefore summarised when read, not when its first span lands.  Bounded: at most
``max_traces`` traces (the least recently updated is evicted) and ``max_spans_per_trace`` spans
each (later ones dropped and counted); a span seen twice (a batch delivered again) counts once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from shared.schemas import SpanBatch, SpanRecord


class _Trace:
    __slots__ = ("_summary", "spans")

    def __init__(self) -> None:
        self.spans: dict[str, SpanRecord] = {}
        self._summary: dict[str, Any] | None = None  # cached until a span is added

    def add(self, span: SpanRecord) -> None:
        self.spans[span.span_id] = span
        self._summary = None

    def summary(self, trace_id: str) -> dict[str, Any]:
        if self._summary is None:
            spans = self.spans.values()
            start = min(s.start_ns for s in spans)
            end = max(s.end_ns for s in spans)
            # The root: a span whose parent is not here (not yet arrived, or none); the earliest.
            orphans = [s for s in spans if not s.parent_id or s.parent_id not in self.spans]
            root = min(orphans or spans, key=lambda s: (s.start_ns, bool(s.parent_id)))
            self._summary = {
                "trace_id": trace_id,
                "root": root.name,
                "service": root.service,
                "start_ns": start,
                "duration_ms": max(0, end - start) / 1e6,
                "spans": len(self.spans),
                "error": any(s.error for s in spans),
            }
        return dict(self._summary)  # a copy: the cache stays the store's


class TraceStore:
    """The last ``max_traces`` traces by arrival.  Pure and single-threaded (the service's loop)."""

    def __init__(self, max_traces: int = 200, max_spans_per_trace: int = 500) -> None:
        if max_traces < 1 or max_spans_per_trace < 1:
            raise ValueError(f"limits must be at least 1, got {max_traces} traces, {max_spans_per_trace} spans")
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.evicted_traces = 0
        self.dropped_spans = 0  # over a trace's span limit
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # least recently updated first

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, batch: SpanBatch) -> None:
        for span in batch.spans:
            trace_id = span.trace_id.lower()
            trace = self._traces.get(trace_id)
            if trace is None:
                if len(self._traces) >= self.max_traces:
                    self._traces.popitem(last=False)
                    self.evicted_traces += 1
                trace = self._traces[trace_id] = _Trace()
            else:
                self._traces.move_to_end(trace_id)
            if span.span_id not in trace.spans and len(trace.spans) >= self.max_spans_per_trace:
                self.dropped_spans += 1
                continue
            trace.add(span)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Summaries of the newest ``limit`` traces, by start time, newest first:
        ``{trace_id, root, service, start_ns, duration_ms, spans, error}``."""
        summaries = [trace.summary(trace_id) for trace_id, trace in self._traces.items()]
        summaries.sort(key=lambda s: s["start_ns"], reverse=True)
        return summaries[: max(0, limit)]

    def get(self, trace_id: str) -> list[SpanRecord]:
        """The spans of one trace by start time (parents before the children they started);
        empty when the trace is unknown or already evicted."""
        trace = self._traces.get(trace_id.lower())
        if trace is None:
            return []
        return sorted(trace.spans.values(), key=lambda s: (s.start_ns, bool(s.parent_id), -s.end_ns))
