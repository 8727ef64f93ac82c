"""One request crossing two service processes is one trace, exported over real OTLP/HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from shared.names import Names
from tests.apps.echo import EchoReply, EchoRequest
from tests.helpers import ServiceProcess, eventually
from tests.otlp import KIND_CLIENT, KIND_CONSUMER, OtlpReceiver, SpanRecord

pytestmark = pytest.mark.slow


# Span kinds in the OTLP protobuf enum.


async def test_request_across_two_services_is_one_trace(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    otlp: tuple[OtlpReceiver, str],
) -> None:
    receiver, url = otlp
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "AIMESH_TRACE_SAMPLE_RATIO": "1",
    }
    echo = spawn("tests.apps.echo", **env)
    front = spawn("tests.apps.chain", **env)
    await asyncio.gather(
        echo.wait_ready(nats_url, names.micro_name("echo")), front.wait_ready(nats_url, names.micro_name("front"))
    )

    reply = await nc.request(names.endpoint("front", "hop"), msgspec.msgpack.encode(EchoRequest(text="x")), timeout=10)
    assert msgspec.msgpack.decode(reply.data, type=EchoReply).text == "front+x"

    async def three_spans() -> list[SpanRecord]:
        spans = [s for s in receiver.spans if "status" not in s.name]
        return spans if len(spans) >= 3 else []

    spans = await eventually(three_spans, 15, "spans from both services")
    front_process = next(s for s in spans if s.service == "front" and s.name.startswith("process"))
    front_send = next(s for s in spans if s.service == "front" and s.name.startswith("send"))
    echo_process = next(s for s in spans if s.service == "echo" and s.name.startswith("process"))

    assert len({front_process.trace_id, front_send.trace_id, echo_process.trace_id}) == 1
    assert front_send.parent_id == front_process.span_id
    assert echo_process.parent_id == front_send.span_id
    assert (front_process.kind, front_send.kind, echo_process.kind) == (KIND_CONSUMER, KIND_CLIENT, KIND_CONSUMER)
    # Low-cardinality names from subject templates; the concrete subject is an attribute.
    assert front_process.name == f"process {names.prefix}.{{service}}.hop"
    assert echo_process.name == f"process {names.prefix}.{{service}}.echo"
    assert echo_process.attributes["messaging.system"] == "nats"
    assert echo_process.attributes["messaging.destination.name"] == names.endpoint("echo", "echo")

    for proc in (front, echo):
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_the_callers_sampling_decision_is_followed(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    otlp: tuple[OtlpReceiver, str],
) -> None:
    # Root sampling off: only a caller that says "sampled" in its traceparent gets spans.
    receiver, url = otlp
    echo = spawn(
        "tests.apps.echo",
        OTEL_SDK_DISABLED="false",
        OTEL_EXPORTER_OTLP_ENDPOINT=url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        AIMESH_TRACE_SAMPLE_RATIO="0",
    )
    await echo.wait_ready(nats_url, names.micro_name("echo"))
    subject = names.endpoint("echo", "echo")
    body = msgspec.msgpack.encode(EchoRequest(text="x"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await nc.request(subject, body, timeout=10)  # a root: not sampled
    await nc.request(subject, body, timeout=10, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    echo.terminate()
    assert await asyncio.to_thread(echo.wait, 20) == 0  # the drain flushes spans
    spans = [s for s in receiver.spans if s.name.startswith("process") and "echo" in s.name]
    assert [(s.trace_id, s.parent_id) for s in spans] == [(trace_id, "00f067aa0ba902b7")]


def test_an_unsampled_caller_context_is_passed_on_without_the_propagator() -> None:
    from shared.tracing import _unsampled_parent

    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    span = _unsampled_parent({"traceparent": f"00-{tid}-{sid}-00"})
    assert span is not None and not span.is_recording()
    ctx = span.get_span_context()
    assert (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", ctx.trace_flags.sampled) == (tid, sid, False)
    # Sampled, malformed or all-zero contexts take the full path.
    for value in (f"00-{tid}-{sid}-01", f"00-{tid}-{sid}", "00-" + "0" * 32 + f"-{sid}-00", f"00-{tid[:-1]}x-{sid}-00"):
        assert _unsampled_parent({"traceparent": value}) is None
    assert _unsampled_parent(None) is None and _unsampled_parent({}) is None
