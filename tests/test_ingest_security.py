"""The ingest service reads only under its roots, and takes other files as uploads.

Against a real nats-server: a path outside the roots (a 0600 file, a link leading out, ``..``, a
name that does not exist) is a 403 before anything is opened or stat'ed, and nothing is stored;
an upload submitted by reference makes the same dataset as the same file read by path.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import NoKeysError

from aimesh.jobs import ingest, upload
from services.ingest.access import Roots
from services.ingest.service import IngestService
from shared.client import request
from shared.config import IngestConfig, MeshConfig
from shared.errors import BadRequest, ConfigError, Forbidden, NotFound
from shared.names import Names
from shared.schemas import IngestAccepted, IngestRequest
from tests.helpers import ROOT

CSV = "a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(300))
OUTSIDE = "outside the folders the ingest service reads"
HAS_SHADOW = os.path.exists("/etc/shadow")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sibling whose name starts with the root's: ``data2`` is not in ``data``."""
    folder = tmp_path / "data2"
    folder.mkdir()
    secret = folder / "secret.csv"
    secret.write_text(CSV)
    secret.chmod(0o600)
    return folder


@pytest.fixture
async def svc(mesh_config: MeshConfig, root: Path) -> AsyncIterator[IngestService]:
    async with IngestService(mesh_config, IngestConfig(roots=[str(root)])) as service:
        yield service


async def submit(nc: NatsClient, names: Names, **kw: Any) -> IngestAccepted:
    return await request(nc, names.ingest_submit, IngestRequest(**kw), IngestAccepted, timeout_s=30)


async def nothing_stored(nc: NatsClient, names: Names) -> None:
    js = nc.jetstream()
    for bucket in (names.ingest_bucket, names.datasets_bucket):
        with pytest.raises(NoKeysError):
            await (await js.key_value(bucket)).keys()
    assert (await js.stream_info(names.data_stream)).state.messages == 0
    assert (await js.stream_info(names.ingest_jobs_stream)).state.messages == 0


# -- paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    ["0600 file outside", "link inside leading out", "dot-dot escape", "relative dot-dot", "missing outside"],
)
async def test_paths_outside_the_roots_are_forbidden_and_nothing_is_stored(
    svc: IngestService, nc: NatsClient, names: Names, root: Path, outside: Path, how: str
) -> None:
    (root / "link.csv").symlink_to(outside / "secret.csv")
    path = {
        "0600 file outside": str(outside / "secret.csv"),
        "link inside leading out": str(root / "link.csv"),
        "dot-dot escape": f"{root}/../data2/secret.csv",
        "relative dot-dot": "../data2/secret.csv",
        "missing outside": str(outside / "absent.csv"),
    }[how]
    with pytest.raises(Forbidden, match=OUTSIDE) as caught:
        await submit(nc, names, paths=[path], dataset="d", label="label")
    assert caught.value.code == 403 and str(svc.roots) in caught.value.description
    await nothing_stored(nc, names)


async def test_existing_and_missing_files_outside_get_the_same_answer(
    svc: IngestService, nc: NatsClient, names: Names, root: Path, outside: Path
) -> None:
    answers = []
    candidates = [str(outside / "secret.csv"), str(outside / "absent.csv")]
    if HAS_SHADOW:
        candidates += ["/etc/shadow", "/etc/no-such-shadow"]
    (root / "dangling.csv").symlink_to(outside / "absent.csv")
    (root / "link.csv").symlink_to(outside / "secret.csv")
    candidates += [str(root / "dangling.csv"), str(root / "link.csv")]
    for path in candidates:
        with pytest.raises(Forbidden) as caught:
            await submit(nc, names, paths=[path], dataset="d")
        answers.append(caught.value.description.replace(path, "PATH"))
    assert len(set(answers)) == 1, answers
    await nothing_stored(nc, names)


async def test_nothing_outside_the_roots_is_opened_or_stated(
    svc: IngestService, nc: NatsClient, names: Names, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[str] = []

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, str | os.PathLike) and str(outside) in os.fspath(path):
                touched.append(f"{real.__name__}({os.fspath(path)})")
            return real(path, *args, **kwargs)

        return call

    for module, name in ((os, "stat"), (os, "lstat"), (builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    for path in (outside / "secret.csv", outside / "absent.csv"):
        with pytest.raises(Forbidden):
            await submit(nc, names, paths=[str(path)], dataset="d")
    assert touched == []


@pytest.mark.parametrize("kind", ["fifo", "folder as csv"])
async def test_only_regular_files_are_read(
    svc: IngestService, nc: NatsClient, names: Names, root: Path, kind: str
) -> None:
    if kind == "fifo":
        os.mkfifo(root / "pipe.csv")  # opening it would block the service
        path, match = str(root / "pipe.csv"), "not a regular file"
    else:
        (root / "folder.csv").mkdir()
        path, match = str(root / "folder.csv"), "is a folder, not a file"
    with pytest.raises(Forbidden, match=match):
        await asyncio.wait_for(submit(nc, names, paths=[path], dataset="d", format="csv"), 10)
    await nothing_stored(nc, names)


async def test_a_text_folder_with_a_link_leading_out_is_forbidden(
    svc: IngestService, nc: NatsClient, names: Names, root: Path, outside: Path
) -> None:
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello\n" * 50)
    (corpus / "b.txt").symlink_to(outside / "secret.csv")
    with pytest.raises(Forbidden, match=OUTSIDE):
        await submit(nc, names, paths=[str(corpus)], dataset="txt", format="text")
    await nothing_stored(nc, names)


async def test_files_inside_the_roots_are_ingested(
    svc: IngestService, nc: NatsClient, names: Names, root: Path
) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "ok.csv").write_text(CSV)
    (root / "alias.csv").symlink_to(root / "sub" / "ok.csv")  # a link that stays inside is fine
    job, manifest = await ingest(nc, names, IngestRequest(paths=["sub/ok.csv"], dataset="ok", label="label"))
    assert manifest is not None, job.error
    assert manifest.records == 300 and manifest.sources == [str((root / "sub" / "ok.csv").resolve())]
    job, manifest = await ingest(nc, names, IngestRequest(paths=[str(root / "alias.csv")], dataset="al"))
    assert manifest is not None, job.error


async def test_demo_sets_are_read_from_the_demo_folder_whatever_the_roots(
    svc: IngestService, nc: NatsClient, names: Names
) -> None:
    job, manifest = await ingest(nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=2))
    assert manifest is not None, job.error
    assert manifest.records == 1797 and job.request.paths == ["demo:digits"]


def test_roots_compare_whole_components_and_resolve_links(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "x.csv").write_text("a\n1\n")
    (tmp_path / "data" / "in.csv").write_text("a\n1\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")  # a root given through a link
    roots = Roots.from_config([str(tmp_path / "link")])
    assert roots.dirs == [(tmp_path / "data").resolve()]
    assert roots.resolve(str(tmp_path / "link" / "in.csv")) == (tmp_path / "data" / "in.csv").resolve()
    assert roots.resolve("in.csv") == (tmp_path / "data" / "in.csv").resolve()
    for bad in (str(tmp_path / "data2" / "x.csv"), str(tmp_path / "link" / ".." / "data2" / "x.csv"), "/"):
        with pytest.raises(Forbidden, match=OUTSIDE):
            roots.resolve(bad)
    with pytest.raises(BadRequest, match="NUL"):
        roots.resolve(str(tmp_path / "data" / "in\0.csv"))
    with pytest.raises(BadRequest, match="no such file"):
        roots.resolve(str(tmp_path / "data" / "absent.csv"))
    with pytest.raises(ConfigError, match="no-such-root"):
        Roots.from_config([str(tmp_path / "no-such-root")])
    with pytest.raises(Forbidden, match="not a regular file"):
        Roots.from_config(["/dev"]).resolve("/dev/null")  # a device, even inside a root


async def test_the_cli_shows_the_403_and_exits_non_zero_then_uploads(
    svc: IngestService, nats_url: str, names: Names, outside: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "OTEL_", "NATS_"))}
    env.update(PYTHONPATH=str(ROOT), OTEL_SDK_DISABLED="true")
    common = ["--nats-url", nats_url, "--prefix", names.prefix, "--data-dir", str(tmp_path / "no-mesh")]

    def aimesh(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "aimesh", *args, *common]
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    secret = str(outside / "secret.csv")
    refused = await asyncio.to_thread(aimesh, "ingest", secret, "--dataset", "s", "--label", "label")
    assert refused.returncode == 2, refused.stderr
    assert "aimesh ingest: 403 " in refused.stderr and OUTSIDE in refused.stderr and "--upload" in refused.stderr
    sent = await asyncio.to_thread(aimesh, "ingest", "--upload", secret, "--dataset", "s", "--label", "label", "--json")
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert result["manifest"]["records"] == 300 and result["manifest"]["sources"][0].startswith("upload:sha256-")


# -- uploads -------------------------------------------------------------------------------------
async def test_an_upload_makes_the_same_dataset_as_the_path(
    svc: IngestService,
    nc: NatsClient,
    names: Names,
    root: Path,
    nats_url: str,
    tmp_path: Path,
) -> None:
    local = tmp_path / "mine.csv"  # outside the service's root: only an upload can bring it in
    rows = 80_000  # ~1.3 MB: several object store chunks
    local.write_text("".join(["f0,f1,label\n", *(f"{i / 7:.5f},{i % 11},{i % 3}\n" for i in range(rows))]))
    name = await upload(nc, names, local)
    assert name.startswith("sha256-")
    req = IngestRequest(object=name, dataset="up", label="label", shards=3, batch_bytes=64 * 1024)
    job, by_upload = await ingest(nc, names, req, progress=False)
    assert by_upload is not None, job.error
    assert by_upload.sources == [f"upload:{name}"] and by_upload.format == "csv"
    assert svc.tmp_dir is not None and list(svc.tmp_dir.iterdir()) == []  # the copy is gone
    again, same = await ingest(nc, names, req, progress=False)  # the same upload is the same job
    assert (again.job_id, same) == (job.job_id, by_upload)

    # The same file by path, on a mesh of its own, makes byte-identical batches.
    (root / "mine.csv").write_bytes(local.read_bytes())
    ref_names = Names(names.prefix + "ref")
    async with IngestService(MeshConfig(nats_url=nats_url, prefix=ref_names.prefix), IngestConfig(roots=[str(root)])):
        by_path_req = IngestRequest(
            paths=[str(root / "mine.csv")], dataset="up", label="label", shards=3, batch_bytes=64 * 1024
        )
        _, by_path = await ingest(nc, ref_names, by_path_req, progress=False)
    assert by_path is not None
    assert by_upload.records == by_path.records == rows
    assert [(s.records, s.batches, s.sha256) for s in by_upload.shards] == [
        (s.records, s.batches, s.sha256) for s in by_path.shards
    ]


async def test_bad_upload_requests_get_a_clear_error(
    svc: IngestService, nc: NatsClient, names: Names, root: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match="no upload named 'sha256-nope'"):
        await submit(nc, names, object="sha256-nope", dataset="u", format="csv")
    with pytest.raises(BadRequest, match=re.escape("upload name '../etc/passwd' must be")):
        await submit(nc, names, object="../etc/passwd", dataset="u", format="csv")
    (tmp_path / "x.csv").write_text(CSV)
    name = await upload(nc, names, tmp_path / "x.csv")
    with pytest.raises(BadRequest, match="either paths or the object"):
        await submit(nc, names, object=name, paths=[str(root)], dataset="u")
    with pytest.raises(BadRequest, match="no input given"):
        await submit(nc, names, dataset="u")


async def test_uploads_over_max_upload_bytes_are_refused(
    mesh_config: MeshConfig, nc: NatsClient, names: Names, root: Path, tmp_path: Path
) -> None:
    async with IngestService(mesh_config, IngestConfig(roots=[str(root)], max_upload_bytes=1000)):
        (tmp_path / "big.csv").write_text(CSV)
        name = await upload(nc, names, tmp_path / "big.csv")
        with pytest.raises(BadRequest, match=r"above max_upload_bytes \(1000\)"):
            await submit(nc, names, object=name, dataset="big")
