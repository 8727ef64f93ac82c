"""Pure logic: names, restart policy, histogram, error codes."""

from __future__ import annotations

import pytest

from aimesh.restart import RestartPolicy
from shared.errors import DeadlineExceeded, Overloaded, ServiceError, error_from_code
from shared.histogram import LatencyHistogram
from shared.names import Names, micro_subjects


def test_names_are_built_from_the_prefix() -> None:
    names = Names("mesh2")
    assert names.infer("digits", "3") == "mesh2.infer.digits.3"
    assert names.data_stream == "MESH2_DATA"
    assert names.micro_name("router") == "mesh2-router"
    with pytest.raises(ValueError, match="no dots"):
        Names("a.b")


def test_micro_subjects_cover_all_verbs_and_scopes() -> None:
    subjects = {s for _, s in micro_subjects("aimesh-router", "ID1")}
    assert "$SRV.PING" in subjects and "$SRV.STATS.aimesh-router" in subjects
    assert "$SRV.INFO.aimesh-router.ID1" in subjects and len(subjects) == 9


def test_restart_backoff_doubles_and_detects_a_crash_loop() -> None:
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=4, loop_restarts=4, loop_window_s=60)
    delays = [policy.on_crash(float(t)) for t in range(6)]
    assert [d for d, _ in delays] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [loop for _, loop in delays] == [False, False, False, True, True, True]
    # Crashes outside the window are forgotten: an occasional crash restarts quickly.
    assert policy.on_crash(1000.0) == (0.5, False)


def test_histogram_quantiles_are_bucket_upper_bounds() -> None:
    h = LatencyHistogram()
    for _ in range(90):
        h.observe_ns(200_000)  # 0.2 ms
    for _ in range(10):
        h.observe_ns(40_000_000)  # 40 ms
    assert h.quantile_s(0.5) == 0.00025
    assert h.quantile_s(0.99) == 0.05
    assert h.cumulative()[-1] == 100


def test_error_codes_round_trip() -> None:
    assert isinstance(error_from_code(429, "busy"), Overloaded)
    assert isinstance(error_from_code(504, "late"), TimeoutError)
    assert isinstance(error_from_code(504, "late"), DeadlineExceeded)
    odd = error_from_code(418, "teapot")
    assert type(odd) is ServiceError and odd.code == 418


def test_progress_and_reports_render() -> None:
    from aimesh.progress import progress_line, rejects_text
    from shared.schemas import IngestJob, IngestRequest, RejectedRow

    job = IngestJob(
        job_id="d-1",
        dataset="d",
        version="3",
        fingerprint="f",
        request=IngestRequest(paths=["a"], dataset="d"),
        state="running",
        records=5000,
        rejected=2,
        bytes_read=50_000_000,
        bytes_total=100_000_000,
        elapsed_s=2.0,
        rejects=[
            RejectedRow(source="a.csv", line=9, column="x", reason="NaN is not allowed"),
            RejectedRow(source="a.csv", line=3, reason="expected 3 fields, got 2"),
        ],
    )
    line = progress_line(job, width=10)
    assert "d@3" in line and "|█████·····|" in line and "2,500 rec/s" in line and "25.0 MB/s" in line
    assert "2 rejected" in line
    report = rejects_text(job).splitlines()
    assert report[1] == "  a.csv:3: expected 3 fields, got 2" and report[2] == "  a.csv:9: x: NaN is not allowed"


async def test_pipelined_object_put_is_readable_by_the_standard_object_store(nc: object) -> None:
    import os

    from shared.names import Names
    from shared.registry import artifacts, put_object

    js = nc.jetstream()  # type: ignore[attr-defined]
    store = await artifacts(js, Names("objtest"))
    data = os.urandom(3 * 1024 * 1024 + 17)
    await put_object(store, "blob", data, chunk_size=256 * 1024)
    got = await store.get("blob")
    assert got.data == data and got.info.chunks == 13 and got.info.size == len(data)
    await put_object(store, "blob", b"small")
    assert (await store.get("blob")).data == b"small"
    stream = await js.stream_info("OBJ_objtest-artifacts")
    assert stream.state.messages == 2  # the replaced object's chunks were purged: 1 chunk + 1 meta
