"""Rendering jobs, models and experiments for a terminal (pure: records in, strings out)."""

from __future__ import annotations

from shared.schemas import DatasetManifest, ExperimentReport, IngestJob, ModelVersion, TrainJob, TrainProgress


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


def train_progress_line(job: TrainJob, progress: TrainProgress | None) -> str:
    head = f"{job.job_id} attempt {job.attempt} {job.state}"
    if job.state == "forming":
        return f"{head}: waiting for {job.request.nodes} trainer nodes, {len(job.members)} joined"
    if progress is None or progress.attempt != job.attempt:
        return f"{head}: {job.world} ranks starting"
    return (
        f"{head}: epoch {progress.epoch + 1}/{job.request.epochs} step {progress.step}/{progress.steps_per_epoch} "
        f"loss {progress.loss:.4f}  {progress.samples_per_s:,.0f} samples/s  ranks {progress.world}"
    )


def version_text(v: ModelVersion, alias_map: dict[str, str] | None = None) -> str:
    names = [a for a, n in (alias_map or {}).items() if n == v.version]
    metrics = ", ".join(f"{k} {val:.4g}" for k, val in sorted(v.metrics.items()))
    return "\n".join(
        [
            f"model {v.model}@{v.version}{' (' + ', '.join(sorted(names)) + ')' if names else ''}: {v.task}, "
            f"{v.factory} {v.kwargs}",
            f"metrics: {metrics or 'none'}",
            f"trained on {v.dataset} by job {v.job_id}; artifact {v.artifact}",
            f"trace {v.trace_id or '-'} (dataset's: {v.dataset_trace_id or '-'}); created {v.created_at}",
        ]
    )


def render_report(report: ExperimentReport) -> str:
    head = f"{report.model}  experiment {report.experiment or '-'}  state {report.state}  control v{report.control}"
    lines = [
        head,
        f"verdict: {report.verdict}" + (f" (v{report.winner})" if report.winner else "") + f": {report.reason}",
        f"sequential test: always-valid p-value, alpha {report.alpha:g}, at least {report.min_samples} rewards per "
        "variant before a verdict",
        "",
        f"  {'variant':<8} {'weight':>6} {'requests':>9} {'err %':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'rewards':>8} {'mean reward [95% CI]':>26} {'lift':>8} {'p':>7}  guardrail",
    ]
    for v in report.variants:
        ci = f"{v.reward_mean:.4f} [{v.reward_ci_low:.4f}, {v.reward_ci_high:.4f}]" if v.rewards else "-"
        lines.append(
            f"  v{v.version:<7} {v.weight:>6g} {v.requests:>9} {v.error_rate * 100:>6.2f} {v.p50_ms:>8.2f} "
            f"{v.p95_ms:>8.2f} {v.p99_ms:>8.2f} {v.rewards:>8} {ci:>26} {v.lift:>+8.4f} {v.p_value:>7.4f}  "
            f"{v.guardrail or '-'}"
        )
    return "\n".join(lines)
