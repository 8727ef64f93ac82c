"""The CLI's ingest progress line and rejects report (aimesh/progress.py)."""

from __future__ import annotations


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
