"""The router's per-route counters and its bounded exposure log (pure), and the rule that keeps
Prometheus labels bounded: only deployed models and versions are named, on the router and in
the metrics service's experiments."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from services.metrics.experiments import ExperimentBook
from services.metrics.service import MetricsService
from services.router.stats import OTHER, ExposureLog, RouteCounters, deployed_versions, route_labels
from shared.config import MeshConfig, MetricsConfig
from shared.names import Names
from shared.routing import RoutingTable
from shared.schemas import Deployment, Exposure, ExposureBatch, Feedback, Mirror, Split, Variant
from tests.helpers import ServiceProcess, eventually
from tests.mesh import deploy_digits, put_split, start_gateway


def test_route_counters_count_requests_errors_by_code_and_latency() -> None:
    counters = RouteCounters()
    counters.record("digits", "1", 200, 0.002)
    counters.record("digits", "1", 503, 0.004)
    counters.record("digits", "2", 200, 0.001)
    one, two = counters.stats()
    assert (one.model, one.version, one.requests, one.errors) == ("digits", "1", 2, {"503": 1})
    assert one.latency_buckets[-1] == 2 and abs(one.latency_sum_s - 0.006) < 1e-9
    assert (two.version, two.requests, two.errors) == ("2", 1, {})


def test_exposure_log_batches_by_model_and_drops_oldest_past_its_bound() -> None:
    log = ExposureLog(max_pending=3, batch_size=2)
    for i in range(4):
        model = "a" if i % 2 else "b"
        log.record(request_id=f"r{i}", model=model, variant="1", experiment="e", latency_s=0.1, code=200)
    assert len(log) == 3 and log.dropped == 1  # r0 went
    batch = log.take()
    assert [e.id for e in batch["a"]] == ["r1"] and [e.id for e in batch["b"]] == ["r2"]
    # A batch that could not be stored goes back in front, within the bound.
    log.put_back(batch["a"] + batch["b"])
    assert len(log) == 3 and log.dropped == 1
    rest = log.take()
    assert [e.id for es in rest.values() for e in es] == ["r1", "r2"]


def test_route_labels_name_only_deployed_models_and_versions() -> None:
    deployed = {"digits": {"1", "2"}}
    assert route_labels("digits", "2", deployed) == ("digits", "2")
    assert route_labels("digits", "9", deployed) == ("digits", OTHER)  # a version not deployed
    assert route_labels("made-up", "1", deployed) == (OTHER, OTHER)
    assert route_labels("made-up", "2", {}) == (OTHER, OTHER)


def test_deployed_versions_are_deployments_their_fallbacks_and_split_versions() -> None:
    table = RoutingTable()
    table.apply(
        "deploy.digits.latest", msgspec.json.encode(Deployment(model="digits", ref="latest", version="3", previous="2"))
    )
    table.apply("deploy.lm.latest", msgspec.json.encode(Deployment(model="lm", ref="latest", version="1")))
    split = Split(model="digits", variants=[Variant(version="4", weight=1)], mirrors=[Mirror(version="5", percent=10)])
    table.apply("split.digits", msgspec.json.encode(split))
    assert deployed_versions(table) == {"digits": {"2", "3", "4", "5"}, "lm": {"1"}}


def test_route_counters_count_unknown_names_under_one_label() -> None:
    counters = RouteCounters(lambda: {"digits": {"1"}})
    counters.record("digits", "1", 200, 0.001)
    for i in range(200):
        counters.record(f"model{i}", "1", 404, 0.001)
        counters.record("digits", f"v{i}", 404, 0.001)
    stats = {(r.model, r.version): r for r in counters.stats()}
    assert set(stats) == {("digits", "1"), ("digits", OTHER), (OTHER, OTHER)}
    assert stats[(OTHER, OTHER)].requests == 200 and stats[(OTHER, OTHER)].errors == {"404": 200}
    assert stats[("digits", OTHER)].requests == 200


def test_feedback_naming_a_variant_that_never_served_adds_no_variant() -> None:
    book = ExperimentBook(max_waiting=10)
    served = Exposure(id="a", model="digits", variant="1", experiment="e1", latency_s=0.01, ts=1.0)
    book.on_exposures(ExposureBatch(router="r", exposures=[served]))
    for i in range(50):  # names a client made up: they wait (bounded), never become variants
        assert not book.on_feedback(Feedback(id=f"x{i}", model="digits", variant=f"made-up-{i}", reward=1.0))
    assert book.on_feedback(Feedback(id="b", model="digits", variant="1", reward=1.0))  # a served one counts
    report = book.evaluate(Split(model="digits", variants=[Variant(version="1", weight=1)], experiment="e1"), 2.0)
    assert [v.version for v in report.variants] == ["1"] and report.variants[0].rewards == 1
    assert book.unmatched == 40


def test_named_feedback_waiting_for_its_variant_counts_once_when_it_serves() -> None:
    book = ExperimentBook()
    first = Exposure(id="a", model="digits", variant="1", experiment="e1", latency_s=0.01, ts=1.0)
    book.on_exposures(ExposureBatch(router="r", exposures=[first]))
    assert not book.on_feedback(Feedback(id="b", model="digits", variant="2", reward=1.0))  # 2 not seen yet
    second = Exposure(id="b", model="digits", variant="2", experiment="e1", latency_s=0.01, ts=1.0)
    book.on_exposures(ExposureBatch(router="r", exposures=[second]))
    book.on_feedback(Feedback(id="b", model="digits", variant="2", reward=0.0))  # a duplicate
    stats = book.experiment("digits", "e1").variant("2")
    assert (stats.requests, stats.rewards, stats.reward_mean) == (1, 1, 1.0)


@pytest.mark.slow
async def test_requests_naming_anything_add_no_series_to_the_metrics_service(
    spawn: Callable[..., ServiceProcess],
    nats_url: str,
    names: Names,
    nc: NatsClient,
    fast: MeshConfig,
    fast_metrics: MetricsConfig,
    http: aiohttp.ClientSession,
) -> None:
    """200 requests with made-up model and version names, and feedback naming made-up variants
    of a model in an experiment, through a real router to a real metrics service: /metrics names
    only what is deployed."""
    _, router, base = await start_gateway(spawn, nats_url, names, router_env={"AIMESH_METRICS_INTERVAL_S": "0.2"})
    await deploy_digits(nc, names)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    split = {"model": "digits", "variants": [{"version": "1", "weight": 100}]}
    served = 0

    async def infer() -> None:
        nonlocal served
        async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
        served += 1

    metrics = MetricsService(fast, fast_metrics)
    async with metrics:

        async def experiment_requests() -> int:
            async with http.get(f"{metrics.http_url}/api/experiments/digits") as resp:
                return sum(v["requests"] for v in (await resp.json())["variants"]) if resp.status == 200 else 0

        await put_split(http, base, split)

        async def in_experiment() -> bool:  # the metrics service knows digits' experiment
            await infer()
            return await experiment_requests() > 0

        await eventually(in_experiment, 20, "digits' experiment with a request on the metrics service")
        for i in range(100):
            for path in (f"/v2/models/ghost{i}/infer", f"/v2/models/digits/versions/ghost{i}/infer"):
                async with http.post(base + path, json=body) as resp:
                    assert resp.status in (404, 503), await resp.text()
            feedback = {"id": f"r{i}", "model": "digits", "variant": f"ghost{i}", "reward": 1.0}
            async with http.post(f"{base}/v1/feedback", json=feedback) as resp:
                assert resp.status == 202, await resp.text()
        await infer()  # counted after the rest: once it shows, so has everything before it
        series = f'aimesh_gateway_requests_total{{instance="{router_id(router)}",model="digits",version="1"}} '

        async def scraped() -> str | None:
            async with http.get(f"{metrics.http_url}/metrics") as resp:
                text = await resp.text()
            return text if f"{series}{served}\n" in text and await experiment_requests() == served else None

        text = await eventually(scraped, 20, f"{series}{served} and the experiment's requests on the metrics service")
    assert "ghost" not in text, [line for line in text.splitlines() if "ghost" in line][:5]
    labels = {
        (m.group(1), m.group(2))
        for m in re.finditer(r'^aimesh_gateway_\w+\{[^}]*model="([^"]*)",version="([^"]*)"', text, re.M)
    }
    assert labels <= {("digits", "1"), ("digits", OTHER), (OTHER, OTHER)}, labels


def router_id(router: ServiceProcess) -> str:
    """The router's instance id, from its log line "router ready (instance ID, ...)"."""
    found = re.search(r"router ready \(instance (\w+)", router.output())
    assert found, router.output()
    return found.group(1)
