"""Ingest throughput, one run, one embedded nats-server.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--cols 32]

(a) end to end: ``aimesh.ingest.submit`` → the ingest service (its own process) parses, shards,
    encodes and publishes a generated CSV (rows × cols float columns + a label) → manifest;
(b) the publish stage alone: the same, already-encoded batches through ``BatchPublisher``;
(c) raw nats-py ``publish_async`` of the same bytes in the same message sizes;
(d) the columnar parser alone (``CsvSource.blocks``) reading the same file;
(e) reading the dataset back with ``DatasetReader`` against a raw ordered consumer.

Goals: (b) ≥ 0.8 × (c); (a) ≥ 0.8 × (d).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402
import numpy as np  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import RetentionPolicy, StorageType, StreamConfig  # noqa: E402

from services.ingest.access import Roots  # noqa: E402
from services.ingest.publish import BatchPublisher  # noqa: E402
from services.ingest.sharding import ShardBatch, Sharder, batch_rows_for  # noqa: E402
from services.ingest.sources import RejectLog, open_source  # noqa: E402
from shared.batches import encode_batch  # noqa: E402
from shared.client import request  # noqa: E402
from shared.datasets import DatasetReader  # noqa: E402
from shared.names import Header, Names  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from shared.schemas import IngestAccepted, IngestJob, IngestRequest  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "aimesh-bench"


def make_csv(rows: int, cols: int) -> Path:
    """rows × cols floats (6 decimals) + an int label; made from a repeated 10k-row block."""
    path = CACHE / f"floats-{rows}x{cols}.csv"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block_rows = min(rows, 10_000)
    values = rng.random((block_rows, cols))
    labels = rng.integers(0, 10, block_rows)
    lines = [",".join(f"{v:.6f}" for v in row) + f",{y}" for row, y in zip(values, labels, strict=True)]
    block = "\n".join(lines) + "\n"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(",".join(f"c{i}" for i in range(cols)) + ",label\n")
        for _ in range(rows // block_rows):
            f.write(block)
    tmp.replace(path)
    return path


def parse_only(req: IngestRequest, threads: int = 2) -> tuple[float, int]:
    source = open_source(req, Roots([CACHE.resolve()]), parse_threads=threads)
    start = time.perf_counter()
    records = sum(len(block) for block in source.blocks(RejectLog()))
    return time.perf_counter() - start, records


def encoded_batches(req: IngestRequest) -> list[tuple[str, bytes, str, int]]:
    source = open_source(req, Roots([CACHE.resolve()]))
    names = Names("benchpub")
    out = []
    sharder: Sharder | None = None
    for block in source.blocks(RejectLog()):
        if sharder is None:
            per_record = sum(v[:1].nbytes for v in block.columns.values())
            sharder = Sharder(req.shards, batch_rows_for(per_record, req.batch_bytes))
        for b in sharder.add(block.columns):
            out.append(_encoded(names, b))
    assert sharder is not None
    out += [_encoded(names, b) for b in sharder.flush()]
    return out


def _encoded(names: Names, b: ShardBatch) -> tuple[str, bytes, str, int]:
    body = encode_batch(dataset="bench", version="1", shard=b.shard, batch=b.batch, offset=b.offset, columns=b.columns)
    return names.data_subject("bench", "1", b.shard), body, f"bench/1/{b.shard}/{b.batch}", b.batch


async def fresh_stream(js: JetStreamContext, name: str, subjects: str) -> None:
    with contextlib.suppress(Exception):
        await js.delete_stream(name)
    config = StreamConfig(
        name=name,
        subjects=[subjects],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msg_size=1 << 20,
        duplicate_window=120,
    )
    await js.add_stream(config)


async def publish_stage(url: str, batches: list[tuple[str, bytes, str, int]], raw: bool) -> float:
    nc = await nats.connect(url, pending_size=8 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=64)
    await fresh_stream(js, "BENCHPUB_DATA", "benchpub.data.>")
    start = time.perf_counter()
    if raw:
        futures = []
        for subject, body, msg_id, _ in batches:
            futures.append(await js.publish_async(subject, body, headers={Header.MSG_ID: msg_id}))
        await asyncio.gather(*futures)
    else:
        publisher = BatchPublisher(js, max_in_flight=64)
        for subject, body, msg_id, batch in batches:
            await publisher.publish(subject, body, msg_id, batch)
        await publisher.flush()
    elapsed = time.perf_counter() - start
    await nc.close()
    return elapsed


async def end_to_end(url: str, names: Names, req: IngestRequest) -> tuple[float, IngestJob]:
    nc = await nats.connect(url)
    start = time.perf_counter()
    accepted = await request(nc, names.ingest_submit, req, IngestAccepted, timeout_s=300)
    kv = await nc.jetstream().key_value(names.ingest_bucket)
    while True:
        job = msgspec.json.decode((await kv.get(accepted.job_id)).value or b"", type=IngestJob)
        if job.state in ("complete", "failed"):
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - start
    await nc.close()
    if job.state != "complete":
        raise SystemExit(f"ingest failed: {job.error}")
    return elapsed, job


async def read_back(url: str, names: Names, dataset: str) -> tuple[float, float, int, int]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    reader = await DatasetReader.open(js, names, dataset)
    start = time.perf_counter()
    records = 0
    for shard in range(len(reader.manifest.shards)):
        async for arrays in reader.stream_shard(shard):
            records += len(arrays["x"])
    ours = time.perf_counter() - start
    start = time.perf_counter()
    nbytes = 0
    for info in reader.manifest.shards:
        queue: asyncio.Queue[object] = asyncio.Queue()
        sub = await js.subscribe(info.subject, ordered_consumer=True, cb=queue.put)
        for _ in range(info.batches):
            msg = await queue.get()
            nbytes += len(msg.data)  # type: ignore[attr-defined]
        await sub.unsubscribe()
    raw = time.perf_counter() - start
    await nc.close()
    return ours, raw, records, nbytes


def _cpu_seconds(pids: list[int]) -> list[float]:
    import psutil

    out = []
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        out.append(times.user + times.system)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of (b) and (c)")
    args = parser.parse_args()

    path = make_csv(args.rows, args.cols)
    size_mb = path.stat().st_size / 1e6
    print(
        f"ingest benchmark: {path} ({size_mb:.0f} MB, {args.rows:,} rows × {args.cols} floats + label); "
        f"{os.cpu_count()} cores"
    )
    req = IngestRequest(paths=[str(path)], dataset="bench", shards=args.shards, label="label")

    d1_s, _ = parse_only(req, threads=1)
    d_s, records = parse_only(req, threads=2)
    batches = encoded_batches(req)
    payload_mb = sum(len(b[1]) for b in batches) / 1e6
    sizes = sorted(len(b[1]) for b in batches)
    print(f"  {len(batches)} batches, median {sizes[len(sizes) // 2] / 1024:.0f} KiB, {payload_mb:.0f} MB encoded")

    store = Path(tempfile.mkdtemp(prefix="aimesh-bench-store-"))
    with NatsServer(store_dir=store, http_port=None) as server:
        # A warm-up into the cold store, then alternating rounds, median of each.
        asyncio.run(publish_stage(server.url, batches, raw=True))
        c_runs, b_runs = [], []
        for _ in range(args.rounds):
            c_runs.append(asyncio.run(publish_stage(server.url, batches, raw=True)))
            b_runs.append(asyncio.run(publish_stage(server.url, batches, raw=False)))
        c_s, b_s = statistics.median(c_runs), statistics.median(b_runs)
        names = Names("bench")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
        env.update(
            AIMESH_NATS_URL=server.url, AIMESH_PREFIX="bench", OTEL_SDK_DISABLED="true", AIMESH_INGEST_ROOTS=str(CACHE)
        )
        service = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=ROOT, env=env)
        try:
            time.sleep(2.0)  # the service declares its streams; the submit below waits for it anyway
            cpu = _cpu_seconds([service.pid, server.process.pid if server.process else 0])
            a_s, job = asyncio.run(end_to_end(server.url, names, req))
            cpu_after = _cpu_seconds([service.pid, server.process.pid if server.process else 0])
            asyncio.run(read_back(server.url, names, "bench"))  # warm the store's pages
            reads = [asyncio.run(read_back(server.url, names, "bench")) for _ in range(2)]
            ours = min(r[0] for r in reads)
            raw = min(r[1] for r in reads)
            _, _, read_records, read_bytes = reads[0]
        finally:
            service.terminate()
            service.wait(30)

    def row(label: str, seconds: float, mb: float, recs: int | None) -> None:
        rate = f"{recs / seconds:>12,.0f} rec/s" if recs else " " * 18
        print(f"  {label:<44} {seconds:>7.2f} s {mb / seconds:>8.1f} MB/s {rate}")

    print()
    row("(a) end to end through the service", a_s, size_mb, job.records)
    row("(d) columnar parser alone (2 threads, as (a))", d_s, size_mb, records)
    row("    the same on 1 thread", d1_s, size_mb, records)
    row(f"(b) publish stage (BatchPublisher), median of {args.rounds}", b_s, payload_mb, None)
    row(f"(c) raw nats-py publish_async, median of {args.rounds}", c_s, payload_mb, None)
    row("(e) DatasetReader, all shards", ours, read_bytes / 1e6, read_records)
    row("    raw ordered consumer, same subjects", raw, read_bytes / 1e6, read_records)
    service_cpu, server_cpu = (after - before for after, before in zip(cpu_after, cpu, strict=True))
    print(
        f"\n  CPU during (a): ingest service {service_cpu:.2f} s, nats-server {server_cpu:.2f} s "
        f"(wall {a_s:.2f} s on {os.cpu_count()} cores); (d) parses on 2 threads"
    )
    print(f"  (a)/(d) = {d_s / a_s:.2f}   (goal ≥ 0.8: ingest bound by parsing)")
    print(f"  (b)/(c) = {c_s / b_s:.2f}   (goal ≥ 0.8)")
    print(f"  reader/raw = {raw / ours:.2f}")


if __name__ == "__main__":
    main()
