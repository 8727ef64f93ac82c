"""OpenTelemetry for the mesh: provider set-up from the standard ``OTEL_*`` variables, W3C trace
context in NATS headers, and messaging spans named per the OpenTelemetry conventions.

Exporters (the standard variables, nothing of our own):

- ``OTEL_SDK_DISABLED=true``: tracing off; the API's no-op tracer, no context is propagated.
- ``OTEL_TRACES_EXPORTER``: ``otlp`` / ``console`` / ``none`` (comma-separated for several).
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set: OTLP over
  HTTP/protobuf, even when ``OTEL_TRACES_EXPORTER`` is unset.
- neither: spans are still created (trace ids reach the logs and travel downstream in headers)
  but exported nowhere.  Unlike the SDK's own default we do not assume a collector on
  localhost:4318, which on a laptop would only log connection errors.
- ``OTEL_TRACES_SAMPLER`` / ``_ARG`` choose the sampler as usual (default: parent-based,
  always on).
- ``setup_tracing(to_mesh=True)`` adds one of our own, besides: finished spans published on the
  mesh for the metrics service's dashboard (``shared.spanexport``), once the service has
  connected and called :func:`attach_mesh_exporter`.

Span shape (messaging semantic conventions): a request is a CLIENT span ``send <template>``, a
publish a PRODUCER span ``send <template>``, handling a message a CONSUMER span
``process <template>`` whose parent is the context found in the message's headers.  Names use
the subject *template* (``aimesh.infer.{model}.{version}``) to stay low-cardinality; the
concrete subject is the ``messaging.destination.name`` attribute.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from shared.names import Header

if TYPE_CHECKING:
    from shared.spanexport import MeshSpanExporter

log = logging.getLogger(__name__)

TRACER_NAME = "aimesh"

# Attribute names from the OpenTelemetry messaging conventions.
SYSTEM = "messaging.system"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
DESTINATION = "messaging.destination.name"
DESTINATION_TEMPLATE = "messaging.destination.template"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"

_provider: Any = None  # the SDK TracerProvider we installed, for flushing at shutdown
_mesh_exporter: MeshSpanExporter | None = None  # with setup_tracing(to_mesh=True)
MESH_EXPORT_DELAY_MS = 1000.0


def tracing_disabled() -> bool:
    return _DISABLED


_DISABLED = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def setup_tracing(
    service: str,
    instance_id: str,
    version: str,
    namespace: str,
    sample_ratio: float = 1.0,
    *,
    to_mesh: bool = False,
) -> None:
    """Install the global tracer provider for this process (once; later calls keep it).

    ``sample_ratio`` is the share of *root* traces recorded when ``OTEL_TRACES_SAMPLER`` is not
    set; a message whose headers carry a trace context follows its caller's decision.
    ``to_mesh`` also sends finished spans to the metrics service (besides the ``OTEL_*``
    exporters) once :func:`attach_mesh_exporter` is given a way to publish; a later call with
    ``to_mesh`` adds that exporter to the provider already installed.
    """
    global _provider
    if tracing_disabled():
        return
    if _provider is not None:
        if to_mesh:
            _add_mesh_exporter(_provider, service, instance_id)
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or service,
            "service.namespace": namespace,
            "service.instance.id": instance_id,
            "service.version": version,
        }
    )
    sampler = None
    id_generator = _PresetIdGenerator()
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        ratio = TraceIdRatioBased(sample_ratio)
        sampler = ParentBased(ratio)
        _fast_roots.configure(id_generator, ratio.bound, TraceIdRatioBased.TRACE_ID_LIMIT)
    provider = TracerProvider(resource=resource, sampler=sampler, id_generator=id_generator)
    for exporter in _exporters_from_env():
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(exporter))
    if to_mesh:
        _add_mesh_exporter(provider, service, instance_id)
    trace.set_tracer_provider(provider)
    _provider = provider


def _add_mesh_exporter(provider: Any, service: str, instance_id: str) -> None:
    global _mesh_exporter
    if _mesh_exporter is not None:
        return
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from shared.spanexport import MeshSpanExporter

    exporter = MeshSpanExporter(os.environ.get("OTEL_SERVICE_NAME") or service, instance_id)
    # About a second between batches (the dashboard polls every 2 s), unless OTEL_BSP_SCHEDULE_DELAY says.
    delay_ms = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else MESH_EXPORT_DELAY_MS
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms))
    _mesh_exporter = exporter


def attach_mesh_exporter(publish: Callable[[bytes], None]) -> None:
    """Send finished spans through ``publish(encoded SpanBatch)``, which is called from the span
    processor's thread: it must be thread-safe and must not block (``shared.spanexport.
    LoopPublisher`` around ``nc.publish``).  A no-op unless ``setup_tracing(to_mesh=True)`` ran."""
    if _mesh_exporter is not None:
        _mesh_exporter.attach(publish)


def detach_mesh_exporter(publish: Callable[[bytes], None] | None = None) -> None:
    """Stop sending spans to the mesh (they are dropped and counted until attached again); with
    ``publish``, only if that is the one attached."""
    if _mesh_exporter is not None:
        _mesh_exporter.detach(publish)


def mesh_exporter() -> MeshSpanExporter | None:
    """The mesh exporter installed by ``setup_tracing(to_mesh=True)``, for its counts."""
    return _mesh_exporter


def _exporters_from_env() -> list[Any]:
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    exporters: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if name in ("otlp", "otlp_proto_http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console, none); ignored", name)
    return exporters


def flush_tracing(timeout_s: float = 5.0) -> None:
    """Export pending spans now (the last step of a service's drain).  The provider itself is
    shut down by the SDK at interpreter exit."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


_tracer: trace.Tracer | None = None
_NO_PARENT = otel_context.Context()


class _PresetIdGenerator(RandomIdGenerator):
    """Random ids, except a trace id preset by :class:`_FastRoots`, so that its root-sampling
    decision and the SDK's ratio sampler judge the same trace id."""

    def __init__(self) -> None:
        self.preset_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        preset, self.preset_trace_id = self.preset_trace_id, None
        return preset if preset is not None else super().generate_trace_id()


class _FastRoots:
    """The unsampled-root decision without the SDK's span machinery.

    Most messages on a hot path arrive without a trace context and, at the default 1% ratio,
    are not sampled; the SDK spends ~2.5 µs building a non-recording span for each.  This makes
    the same decision as ``TraceIdRatioBased`` on a fresh trace id in ~0.7 µs, and hands sampled
    roots to the SDK with that very trace id.  Off when ``OTEL_TRACES_SAMPLER`` is set.
    """

    def __init__(self) -> None:
        self.ids: _PresetIdGenerator | None = None
        self.bound = 0
        self.mask = 0

    def configure(self, ids: _PresetIdGenerator, bound: int, mask: int) -> None:
        self.ids, self.bound, self.mask = ids, bound, mask

    def unsampled(self) -> Span | None:
        """A non-recording root span if this root is not sampled, else None (and the next SDK
        trace id is preset to the one judged)."""
        ids = self.ids
        if ids is None:
            return None
        trace_id = ids.generate_trace_id()
        if trace_id & self.mask < self.bound:
            ids.preset_trace_id = trace_id
            return None
        return NonRecordingSpan(SpanContext(trace_id, ids.generate_span_id(), False, TraceFlags(TraceFlags.DEFAULT)))


_fast_roots = _FastRoots()


def tracer() -> trace.Tracer:
    """This process's tracer, looked up once: ``get_tracer`` costs microseconds per call."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def inject(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into outgoing NATS headers."""
    propagate.inject(headers)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    if not headers:
        return None
    return propagate.extract(headers)


TRACEPARENT = Header.TRACEPARENT


def _unsampled_parent(headers: Mapping[str, str] | None) -> Span | None:
    """A caller's unsampled context (``traceparent`` version 00, flags 00) without the
    propagator's work: the handler's span is then non-recording anyway, so it is that context
    itself, cheaply, and it is passed on as is."""
    if not headers:
        return None
    value = headers.get(TRACEPARENT)
    if value is None or len(value) != 55 or not value.startswith("00-") or not value.endswith("-00"):
        return None
    try:
        trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(0)))


def start_consumer_span(
    name: str, template: str, subject: str, headers: Mapping[str, str] | None, queue_group: str | None
) -> Span:
    """The CONSUMER span ``name`` for handling one message, child of the context in its headers.

    Attributes are set only on a recording span: an unsampled message costs no attribute work.
    """
    unsampled = _unsampled_parent(headers)
    if unsampled is not None:
        return unsampled
    parent = extract(headers)
    if parent is None:
        root = _fast_roots.unsampled()
        if root is not None:
            return root
    # Never a child of whatever span happens to be current: only of the message's context.
    span = tracer().start_span(name, context=parent or _NO_PARENT, kind=SpanKind.CONSUMER)
    if span.is_recording():
        span.set_attributes(
            {
                SYSTEM: "nats",
                OPERATION_NAME: "process",
                OPERATION_TYPE: "process",
                DESTINATION: subject,
                DESTINATION_TEMPLATE: template,
            }
        )
        if queue_group:
            span.set_attribute(CONSUMER_GROUP, queue_group)
    return span


@contextmanager
def send_span(template: str, subject: str, headers: MutableMapping[str, str], *, request: bool) -> Iterator[Span]:
    """A CLIENT (request) or PRODUCER (publish) span around a send; injects its context.
    With tracing off it costs nothing: no span, no context switch, no headers."""
    if tracing_disabled():
        yield trace.INVALID_SPAN
        return
    current = trace.get_current_span()
    ctx = current.get_span_context()
    if ctx.is_valid and not ctx.trace_flags.sampled:
        # An unsampled trace: nothing is recorded, so no child span either; the receiver only
        # needs to know the trace is unsampled (parent-based sampling keeps it so downstream).
        headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-00"
        yield current
        return
    span = tracer().start_span(
        f"send {template}",
        kind=SpanKind.CLIENT if request else SpanKind.PRODUCER,
        attributes={
            SYSTEM: "nats",
            OPERATION_NAME: "send",
            OPERATION_TYPE: "send",
            DESTINATION: subject,
            DESTINATION_TEMPLATE: template,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        inject(headers)
        yield span
    except BaseException as exc:
        mark_error(span, type(exc).__name__, str(exc))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def start_server_span(method: str, route: str, path: str, headers: Mapping[str, str]) -> Span:
    """The SERVER span of an HTTP request (HTTP semantic conventions), child of the caller's
    ``traceparent`` if it sent one."""
    unsampled = _unsampled_parent(headers)
    if unsampled is not None:
        return unsampled
    parent = propagate.extract(headers) if TRACEPARENT in headers else None
    if parent is None:
        root = _fast_roots.unsampled()
        if root is not None:
            return root
    span = tracer().start_span(f"{method} {route}", context=parent or _NO_PARENT, kind=SpanKind.SERVER)
    if span.is_recording():
        span.set_attributes({"http.request.method": method, "http.route": route, "url.path": path})
    return span


def start_batch_span(name: str, requests: list[SpanContext], attributes: dict[str, Any]) -> Span:
    """The span of work done for several requests at once (a batch's forward pass): a child of
    the first sampled request, so it appears in that request's trace, with links to every
    request it served."""
    from opentelemetry.trace import Link, NonRecordingSpan

    valid = [c for c in requests if c.is_valid]
    parent = next((c for c in valid if c.trace_flags.sampled), valid[0] if valid else None)
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else _NO_PARENT
    return tracer().start_span(
        name, context=context, kind=SpanKind.INTERNAL, links=[Link(c) for c in valid], attributes=attributes
    )


def current_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def mark_error(span: Span, error_type: str, description: str) -> None:
    if span.is_recording():
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, description))


def activate(span: Span) -> object:
    """Make ``span`` current; returns a token for :func:`deactivate`."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as hex, for log records."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
