"""``aimesh demo``: the mesh of ``aimesh up`` plus the pipeline run end to end on built-in data.

So far: ingest the demo digits (CSV from scikit-learn's bundled set, 4 shards) and the Python
standard library text corpus (byte-level tokens), and print their manifests.  Later issues add
training, serving and experiments to the same command.
"""

from __future__ import annotations

import asyncio
import sys

import nats
from nats.aio.client import Client as NatsClient

from aimesh.datasets_cmd import ingest
from aimesh.progress import manifest_text
from aimesh.supervisor import Supervisor
from shared.discovery import discover
from shared.errors import MeshError
from shared.names import Names
from shared.schemas import IngestRequest, MicroPing

DEMO_SETS = (
    IngestRequest(paths=["demo:digits"], dataset="digits", shards=4),
    IngestRequest(paths=["demo:pytext"], dataset="pytext", shards=2, seq_len=128),
)


async def wait_for_service(nc: NatsClient, names: Names, service: str, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name(service), wait_s=0.5)
        if any(p.metadata.get("state") == "ready" for p in pings):
            return
        await asyncio.sleep(0.2)
    raise MeshError(f"no {service} service became ready within {timeout_s:g}s; see its log above")


async def run_demo(supervisor: Supervisor, names: Names, stop: asyncio.Event, *, exit_when_done: bool) -> int:
    await supervisor.started.wait()
    assert supervisor.nats_url is not None
    code = 0
    nc = await nats.connect(supervisor.nats_url)
    try:
        await wait_for_service(nc, names, "ingest")
        for req in DEMO_SETS:
            print(f"\n== ingest {req.paths[0]} as {req.dataset}", flush=True)
            job, manifest = await ingest(nc, names, req, progress=sys.stdout.isatty(), out=sys.stdout)
            if manifest is None:
                print(f"demo: ingest of {req.dataset} failed: {job.error}", file=sys.stderr)
                code = 1
                break
            print(manifest_text(manifest), flush=True)
    except MeshError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        await nc.close()
    print(
        f"\nNATS: {supervisor.nats_url}   status: aimesh status --data-dir {supervisor.data_dir}"
        f"   datasets: aimesh datasets --data-dir {supervisor.data_dir}",
        flush=True,
    )
    if exit_when_done or code:
        stop.set()
    else:
        print("the mesh keeps running; Ctrl-C stops it", flush=True)
    return code
