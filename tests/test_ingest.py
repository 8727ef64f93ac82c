"""The ingest service against a real nats-server: formats, rejects, sharding, idempotence."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from aimesh.jobs import ingest
from services.ingest.service import IngestService
from shared.batches import batch_arrays, decode_batch
from shared.client import request
from shared.config import IngestConfig, MeshConfig
from shared.datasets import DatasetReader, get_manifest, shards_for_rank
from shared.errors import BadRequest, NotFound
from shared.names import Names
from shared.schemas import DatasetManifest, IngestAccepted, IngestJob, IngestRequest


@pytest.fixture
async def svc(mesh_config: MeshConfig, tmp_path: Path) -> AsyncIterator[IngestService]:
    async with IngestService(mesh_config, IngestConfig(roots=[str(tmp_path)])) as service:  # it reads only there
        yield service


def write_csv(path: Path, rows: int, cols: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.random((rows, cols)).astype(np.float32)
    labels = np.arange(rows) % 3
    lines = [",".join([*(f"f{i}" for i in range(cols)), "label"])]
    lines += [",".join([*(f"{v:.6f}" for v in row), str(y)]) for row, y in zip(values, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)


async def run(nc: NatsClient, names: Names, **kw: object) -> tuple[IngestJob, DatasetManifest | None]:
    return await ingest(nc, names, IngestRequest(**kw), progress=False)  # type: ignore[arg-type]


async def stored_bodies(nc: NatsClient, names: Names, manifest: DatasetManifest, shard: int) -> list[bytes]:
    sub = await nc.jetstream().subscribe(manifest.shards[shard].subject, ordered_consumer=True)
    bodies = [(await sub.next_msg(5)).data for _ in range(manifest.shards[shard].batches)]
    await sub.unsubscribe()
    return bodies


async def test_csv_round_trips_with_checksums_and_balanced_shards(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    table = write_csv(tmp_path / "data.csv", rows=10_001)
    job, manifest = await run(
        nc, names, paths=[str(tmp_path / "data.csv")], dataset="tab", shards=4, label="label", batch_bytes=16 * 1024
    )
    assert manifest is not None, job.error
    assert (manifest.records, manifest.rejected, manifest.label) == (10_001, 0, "label")
    sizes = [s.records for s in manifest.shards]
    assert sum(sizes) == 10_001 and max(sizes) - min(sizes) <= 1
    assert manifest.features == ["f0", "f1", "f2", "f3"]
    for shard in manifest.shards:
        bodies = await stored_bodies(nc, names, manifest, shard.index)
        assert hashlib.sha256(b"".join(bodies)).hexdigest() == shard.sha256
        assert [decode_batch(b).batch for b in bodies] == list(range(shard.batches))
        assert all(len(b) <= 16 * 1024 + 1024 for b in bodies)
    # Round-robin: record g is in shard g % 4 at position g // 4.
    reader = DatasetReader(nc.jetstream(), names, manifest)
    shard1 = await reader.load([1])
    np.testing.assert_allclose(shard1["x"], table[1::4, :4], rtol=1e-6)
    np.testing.assert_array_equal(shard1["y"], table[1::4, 4].astype(np.int64))


async def test_bad_rows_are_rejected_with_line_column_and_reason(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    lines = ["a,b,label"] + [f"{i}.5,{i}.25,{i % 2}" for i in range(400)]
    lines[5] = "1,2"  # wrong field count, line 6
    lines[10] = "oops,1,0"  # unparsable, line 11
    lines[20] = "nan,1,1"  # NaN, line 21
    lines[30] = ",1,1"  # missing, line 31
    lines[40] = "inf,1,0"  # inf, line 41
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    job, manifest = await run(
        nc, names, paths=[str(tmp_path / "bad.csv")], dataset="bad", shards=2, label="label", max_reject_ratio=0.05
    )
    assert manifest is not None and manifest.records == 395 and manifest.rejected == 5
    found = {(r.line, r.column, r.reason) for r in job.rejects}
    assert found == {
        (6, None, "expected 3 fields, got 2"),
        (11, "a", "cannot parse 'oops' as float32"),
        (21, "a", "NaN is not allowed"),
        (31, "a", "missing value"),
        (41, "a", "±inf is not allowed"),
    }


async def test_too_many_rejects_fail_the_job_and_leave_no_data(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    lines = ["a,label"] + [f"{'x' if i % 20 == 0 else i},{i % 2}" for i in range(2000)]
    (tmp_path / "dirty.csv").write_text("\n".join(lines) + "\n")
    job, manifest = await run(nc, names, paths=[str(tmp_path / "dirty.csv")], dataset="dirty", label="label")
    assert manifest is None and job.state == "failed"
    assert "records rejected" in job.error and "above max_reject_ratio (1.00%)" in job.error
    with pytest.raises(NotFound):
        await get_manifest(nc.jetstream(), names, "dirty")
    info = await nc.jetstream().stream_info(
        names.data_stream, subjects_filter=names.data_version_subjects("dirty", "1")
    )
    assert not info.state.subjects


@pytest.mark.parametrize(
    ("paths", "fmt", "message"),
    [
        (["{tmp}/no/such/file.csv"], None, "no such file or directory"),
        (["{tmp}/data.parquet"], None, "cannot tell the format"),
        (["{tmp}/empty.csv"], None, "the input is empty"),
        (["{tmp}/data.parquet"], "xml", "unknown format 'xml'"),
    ],
)
async def test_bad_requests_get_a_clear_error(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path, paths: list[str], fmt: str | None, message: str
) -> None:
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / "empty.csv").write_text("")
    req = IngestRequest(paths=[p.format(tmp=tmp_path) for p in paths], dataset="d", format=fmt)
    with pytest.raises(BadRequest, match=message):
        await request(nc, names.ingest_submit, req, IngestAccepted, timeout_s=30)


async def test_rerunning_a_job_is_idempotent(svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path) -> None:
    write_csv(tmp_path / "data.csv", rows=3000)
    req = {"paths": [str(tmp_path / "data.csv")], "dataset": "again", "label": "label"}
    first, m1 = await run(nc, names, **req)
    second, m2 = await run(nc, names, **req)
    assert m1 is not None and m2 is not None
    assert (first.job_id, m1.version) == (second.job_id, m2.version) and m1 == m2
    info = await nc.jetstream().stream_info(
        names.data_stream, subjects_filter=names.data_version_subjects("again", "1")
    )
    assert sum(info.state.subjects.values()) == sum(s.batches for s in m1.shards)
    # Different content is a new version.
    write_csv(tmp_path / "data.csv", rows=3000, seed=1)
    _, m3 = await run(nc, names, **req)
    assert m3 is not None and m3.version == "2"
    assert (await get_manifest(nc.jetstream(), names, "again")).version == "2"


async def test_jsonl_with_vectors_labels_and_bad_lines(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    records = [{"id": i, "x": [i, i + 0.5, -i], "label": "cat" if i % 2 else "dog"} for i in range(300)]
    lines = [json.dumps(r) for r in records]
    lines[3] = "{not json"
    lines[4] = json.dumps({"id": 4, "x": [1, 2], "label": "dog"})
    lines[5] = json.dumps({"id": 5, "label": "cat"})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    job, manifest = await run(
        nc,
        names,
        paths=[str(tmp_path / "data.jsonl")],
        dataset="js",
        shards=2,
        label="label",
        shard_by="id",
        max_reject_ratio=0.02,
    )
    assert manifest is not None, job.error
    assert manifest.rejected == 3 and manifest.label_classes == ["dog", "cat"]
    assert {(r.line, r.column) for r in job.rejects} == {(4, None), (5, "x"), (6, "x")}
    assert {c.name: (c.dtype, c.shape) for c in manifest.columns} == {
        "x": ("float32", [3]),
        "y": ("int64", []),
        "id": ("float32", []),
    }
    assert manifest.sharding == "hash:id"


async def test_shard_by_key_keeps_each_key_in_one_shard(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    lines = ["user,v"] + [f"u{i % 7},{i}" for i in range(700)]
    (tmp_path / "k.csv").write_text("\n".join(lines) + "\n")
    _, manifest = await run(nc, names, paths=[str(tmp_path / "k.csv")], dataset="keys", shards=3, shard_by="user")
    assert manifest is not None
    reader = DatasetReader(nc.jetstream(), names, manifest)
    seen: dict[str, int] = {}
    for shard in range(3):
        for user in set((await reader.load([shard]))["user"].tolist()):
            assert seen.setdefault(user, shard) == shard
    assert len(seen) == 7


async def test_npz_features_and_labels_with_nan_rejects(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).random((500, 8, 8))
    x[7, 3, 3] = np.nan
    y = np.arange(500) % 10
    np.savez(tmp_path / "img.npz", x=x, y=y)
    job, manifest = await run(nc, names, paths=[str(tmp_path / "img.npz")], dataset="img", shards=2)
    assert manifest is not None and manifest.rejected == 1 and job.rejects[0].line == 7
    assert {c.name: (c.dtype, c.shape) for c in manifest.columns} == {"x": ("float32", [8, 8]), "y": ("int64", [])}


async def test_text_folder_becomes_token_sequences(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n" * 200)
    (corpus / "b.txt").write_text("ünïcode ✓ " * 100)
    (corpus / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (corpus / "huge.txt").write_text("x" * 5000)
    job, manifest = await run(
        nc, names, paths=[str(corpus)], dataset="txt", shards=2, seq_len=32, max_text_bytes=4000, max_reject_ratio=0.5
    )
    assert manifest is not None, job.error
    assert manifest.tokenizer is not None and manifest.tokenizer.seq_len == 32
    assert {r.reason.split(" (")[0] for r in job.rejects} == {
        "binary file",
        "file of 5000 bytes is longer than max_text_bytes",
    }
    arrays = await DatasetReader(nc.jetstream(), names, manifest).load([0, 1])
    assert arrays["tokens"].shape[1] == 33 and arrays["tokens"].max() <= 256
    first = (await DatasetReader(nc.jetstream(), names, manifest).load([0]))["tokens"][0]
    assert bytes(first[:11].astype(np.uint8)) == b"hello world"


def test_epoch_order_is_deterministic_and_resumable() -> None:
    arrays = {"x": np.arange(100)}
    full = [b["x"] for b in DatasetReader.epoch_batches(arrays, batch_size=8, seed=3, epoch=1)]
    again = [b["x"] for b in DatasetReader.epoch_batches(arrays, batch_size=8, seed=3, epoch=1)]
    other = [b["x"] for b in DatasetReader.epoch_batches(arrays, batch_size=8, seed=3, epoch=2)]
    resumed = [b["x"] for b in DatasetReader.epoch_batches(arrays, batch_size=8, seed=3, epoch=1, offset=40)]
    assert all((a == b).all() for a, b in zip(full, again, strict=True))
    assert not (np.concatenate(full) == np.concatenate(other)).all()
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(full)[40:])
    assert sorted(np.concatenate(full).tolist()) == list(range(100))
    assert shards_for_rank(4, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        shards_for_rank(2, 0, 4)


async def test_job_record_is_json_readable_by_standard_tools(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    table = write_csv(tmp_path / "data.csv", rows=50)
    job, manifest = await run(nc, names, paths=[str(tmp_path / "data.csv")], dataset="rec", label="label")
    kv = await nc.jetstream().key_value(names.ingest_bucket)
    doc = json.loads((await kv.get(job.job_id)).value or b"")
    assert doc["state"] == "complete" and doc["records"] == 50
    assert msgspec.json.decode((await kv.get(job.job_id)).value or b"", type=IngestJob).job_id == job.job_id
    # The stored batches open with the public decoding helpers alone: round-robin, record g is
    # in shard g % shards.
    assert manifest is not None, job.error
    count = len(manifest.shards)
    for shard in manifest.shards:
        arrays = [batch_arrays(decode_batch(b)) for b in await stored_bodies(nc, names, manifest, shard.index)]
        np.testing.assert_allclose(np.concatenate([a["x"] for a in arrays]), table[shard.index :: count, :4], rtol=1e-6)
        np.testing.assert_array_equal(
            np.concatenate([a["y"] for a in arrays]), table[shard.index :: count, 4].astype(np.int64)
        )


async def test_given_schema_and_over_long_text(
    svc: IngestService, nc: NatsClient, names: Names, tmp_path: Path
) -> None:
    rows = ["id,score,note"] + [f"{i},{i / 2},{'n' * (50 if i == 7 else 5)}" for i in range(200)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    job, manifest = await run(
        nc,
        names,
        paths=[str(tmp_path / "s.csv")],
        dataset="sch",
        max_text_bytes=20,
        schema=[{"name": "id", "dtype": "int64"}],
        shard_by="id",
    )
    assert manifest is not None, job.error
    assert [(r.line, r.column) for r in job.rejects] == [(9, "note")]
    assert "text longer than 20 bytes" in job.rejects[0].reason
    columns = {c.name: c.dtype for c in manifest.columns}
    assert columns == {"x": "float32", "id": "int64", "note": "str"} and manifest.features == ["score"]
