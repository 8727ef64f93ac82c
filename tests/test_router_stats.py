"""The router's per-route counters and its bounded exposure log (pure)."""

from __future__ import annotations

from services.router.stats import ExposureLog, RouteCounters


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
