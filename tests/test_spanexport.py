"""Spans to the mesh: the exporter under a real SDK TracerProvider, the loop publisher across
threads, and ``setup_tracing(to_mesh=True)`` wiring (in a child process: the provider is global)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.schemas import SpanBatch
from shared.spanexport import MAX_ATTRIBUTES, MAX_SPANS_PER_BATCH, LoopPublisher, MeshSpanExporter

ROOT = Path(__file__).resolve().parent.parent
_batch = msgspec.msgpack.Decoder(SpanBatch)


class Sink:
    """A thread-safe ``publish(bytes)`` that keeps what it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.messages.append(data)

    def batches(self) -> list[SpanBatch]:
        with self.lock:
            return [_batch.decode(m) for m in self.messages]


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, MeshSpanExporter]]:
    exporter = MeshSpanExporter(service="router", instance="router-7")
    provider = TracerProvider(resource=Resource.create({"service.name": "router", "service.instance.id": "router-7"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    yield provider, exporter
    provider.shutdown()


def test_spans_before_attach_are_dropped_and_counted(provider: tuple[TracerProvider, MeshSpanExporter]) -> None:
    tp, exporter = provider
    tracer = tp.get_tracer("test")
    for _ in range(3):
        with tracer.start_as_current_span("early"):
            pass
    assert tp.force_flush(5000)
    assert (exporter.dropped, exporter.exported, exporter.attached) == (3, 0, False)


def test_finished_spans_become_one_span_batch(provider: tuple[TracerProvider, MeshSpanExporter]) -> None:
    tp, exporter = provider
    sink = Sink()
    exporter.attach(sink)
    tracer = tp.get_tracer("test")
    attributes = {f"attr.{i:02d}": i for i in range(40)}
    with tracer.start_as_current_span("POST /v2/models/{model}/infer", kind=SpanKind.SERVER) as server:
        server.set_attribute("http.route", "/v2/models/{model}/infer")
        server.set_attribute("tags", ["a", "b"])
        server.set_attribute("long", "x" * 1000)
        with tracer.start_as_current_span("send aimesh.infer.{model}.{version}", kind=SpanKind.CLIENT) as client:
            client.set_attributes(attributes)
            client.set_status(Status(StatusCode.ERROR, "inference: internal error (RuntimeError)"))
    assert tp.force_flush(5000)

    (batch,) = sink.batches()
    assert (batch.service, batch.instance) == ("router", "router-7")
    by_name = {s.name: s for s in batch.spans}
    root, child = by_name["POST /v2/models/{model}/infer"], by_name["send aimesh.infer.{model}.{version}"]
    context = server.get_span_context()
    assert root.trace_id == format(context.trace_id, "032x") == child.trace_id
    assert root.span_id == format(context.span_id, "016x")
    assert len(root.trace_id) == 32 and len(root.span_id) == 16 and root.trace_id == root.trace_id.lower()
    assert root.parent_id == "" and child.parent_id == root.span_id
    assert (root.kind, child.kind) == ("SERVER", "CLIENT")
    assert {root.service, child.service} == {"router"}
    assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns
    assert (root.error, child.error) == (False, True)
    assert root.attributes["http.route"] == "/v2/models/{model}/infer"
    assert root.attributes["tags"] == "a, b"
    assert len(root.attributes["long"]) <= 256
    assert len(child.attributes) == MAX_ATTRIBUTES and child.attributes["attr.00"] == "0"
    assert (exporter.exported, exporter.dropped) == (2, 0)

    exporter.detach()
    with tracer.start_as_current_span("late"):
        pass
    assert tp.force_flush(5000)
    assert len(sink.messages) == 1 and exporter.dropped == 1


def test_a_large_export_is_split_into_several_messages(provider: tuple[TracerProvider, MeshSpanExporter]) -> None:
    tp, exporter = provider
    sink = Sink()
    exporter.attach(sink)
    tracer = tp.get_tracer("test")
    for i in range(MAX_SPANS_PER_BATCH + 10):
        with tracer.start_as_current_span(f"span {i}"):
            pass
    assert tp.force_flush(5000)
    sizes = [len(b.spans) for b in sink.batches()]
    assert sum(sizes) == MAX_SPANS_PER_BATCH + 10 and max(sizes) <= MAX_SPANS_PER_BATCH


def test_a_failing_publish_drops_the_spans(provider: tuple[TracerProvider, MeshSpanExporter]) -> None:
    tp, exporter = provider

    def closed(_: bytes) -> None:
        raise RuntimeError("the event loop is closed")

    exporter.attach(closed)
    with tp.get_tracer("test").start_as_current_span("lost"):
        pass
    tp.force_flush(5000)
    assert (exporter.exported, exporter.dropped) == (0, 1)


def test_detach_only_detaches_the_publisher_it_names(provider: tuple[TracerProvider, MeshSpanExporter]) -> None:
    _, exporter = provider
    first, second = Sink(), Sink()
    exporter.attach(first)
    exporter.attach(second)
    exporter.detach(first)
    assert exporter.attached
    exporter.detach(second)
    assert not exporter.attached


async def test_loop_publisher_sends_from_another_thread_on_the_loop() -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    async def send(subject: str, data: bytes) -> None:
        on_loop = asyncio.get_running_loop() is loop
        await got.put((subject, data, on_loop))

    publish = LoopPublisher(loop, send, "aimesh.spans.router")
    await asyncio.to_thread(publish, b"batch")
    assert await publish.wait_sent(5)
    assert got.get_nowait() == ("aimesh.spans.router", b"batch", True)


async def test_loop_publisher_drops_past_its_pending_limit() -> None:
    loop = asyncio.get_running_loop()
    release = asyncio.Event()
    started: asyncio.Queue[bytes] = asyncio.Queue()
    finished: asyncio.Queue[bytes] = asyncio.Queue()

    async def stuck(_: str, data: bytes) -> None:
        await started.put(data)
        await release.wait()
        await finished.put(data)

    publish = LoopPublisher(loop, stuck, "aimesh.spans.router", max_pending=2)
    for i in range(5):
        await asyncio.to_thread(publish, bytes([i]))
    assert {await asyncio.wait_for(started.get(), 5) for _ in range(2)} == {b"\x00", b"\x01"}
    assert publish.dropped == 3
    release.set()
    assert {await asyncio.wait_for(finished.get(), 5) for _ in range(2)} == {b"\x00", b"\x01"}


def test_setup_tracing_to_mesh_sends_the_services_spans() -> None:
    script = textwrap.dedent(
        """
        import msgspec
        from shared import tracing
        from shared.schemas import SpanBatch

        tracing.setup_tracing("inference", "inference-3", "0.1.0", "t1", 1.0, to_mesh=True)
        tracing.setup_tracing("inference", "inference-3", "0.1.0", "t1", 1.0, to_mesh=True)  # idempotent
        with tracing.tracer().start_as_current_span("before attach"):
            pass
        tracing.flush_tracing()
        sent = []
        tracing.attach_mesh_exporter(sent.append)
        with tracing.tracer().start_as_current_span("process aimesh.infer.{model}.{version}"):
            with tracing.tracer().start_as_current_span("forward"):
                pass
        tracing.flush_tracing()
        tracing.detach_mesh_exporter()
        spans = [s for m in sent for s in msgspec.msgpack.decode(m, type=SpanBatch).spans]
        exporter = tracing.mesh_exporter()
        print(len(spans), exporter.dropped, {s.service for s in spans}, {s.name for s in spans if s.parent_id})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AIMESH_"))}
    env |= {"OTEL_SDK_DISABLED": "false", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "2 1 {'inference'} {'forward'}"


def test_setup_tracing_without_to_mesh_has_no_mesh_exporter() -> None:
    script = (
        "from shared import tracing\n"
        "tracing.setup_tracing('router', 'r1', '0.1.0', 't1')\n"
        "tracing.attach_mesh_exporter(print)\n"
        "print(tracing.mesh_exporter())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AIMESH_"))}
    env |= {"OTEL_SDK_DISABLED": "false", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
