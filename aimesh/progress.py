"""Rendering an ingest job's progress and result for a terminal (pure: strings in, strings out)."""

from __future__ import annotations

from shared.schemas import DatasetManifest, IngestJob


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_line(job: IngestJob, width: int = 24) -> str:
    total = job.bytes_total or 1
    frac = min(job.bytes_read / total, 1.0) if job.state != "complete" else 1.0
    filled = int(frac * width)
    bar = "█" * filled + "·" * (width - filled)
    rate = job.records / job.elapsed_s if job.elapsed_s else 0.0
    mbps = job.bytes_read / job.elapsed_s / 1e6 if job.elapsed_s else 0.0
    return (
        f"{job.dataset}@{job.version} {job.state:<8} |{bar}| {frac:4.0%}  {job.records:,} records  "
        f"{rate:,.0f} rec/s  {mbps:.1f} MB/s  {job.rejected:,} rejected"
    )


def manifest_text(m: DatasetManifest) -> str:
    lines = [
        f"dataset {m.dataset}@{m.version}  ({m.format}, {m.records:,} records, {m.rejected:,} rejected, "
        f"{human_bytes(m.bytes)} in {len(m.shards)} shards, {m.sharding})",
        "columns: " + ", ".join(f"{c.name} {c.dtype}{list(c.shape) if c.shape else ''}" for c in m.columns),
    ]
    if m.features:
        shown = ", ".join(m.features[:8]) + (f", … ({len(m.features)} in all)" if len(m.features) > 8 else "")
        lines.append(f"x packs: {shown}")
    if m.label:
        classes = f" (classes: {', '.join(m.label_classes)})" if m.label_classes else ""
        lines.append(f"y is: {m.label}{classes}")
    if m.tokenizer:
        t = m.tokenizer
        lines.append(f"tokenizer: {t.kind}, vocab {t.vocab_size}, eos {t.eos_id}, sequences of {t.seq_len}+1 tokens")
    lines.append(f"{'shard':>5}  {'records':>9}  {'batches':>7}  {'bytes':>10}  sha256")
    for s in m.shards:
        lines.append(f"{s.index:>5}  {s.records:>9,}  {s.batches:>7}  {human_bytes(s.bytes):>10}  {s.sha256}")
    return "\n".join(lines)


def rejects_text(job: IngestJob, limit: int = 10) -> str:
    if not job.rejects:
        return ""
    rows = sorted(job.rejects, key=lambda r: (r.source, r.line))[:limit]
    out = [f"rejected {job.rejected:,} records; the first {len(rows)}:"]
    for r in rows:
        where = f"{r.source}:{r.line}" if r.line else r.source
        out.append(f"  {where}: {r.column + ': ' if r.column else ''}{r.reason}")
    return "\n".join(out)
