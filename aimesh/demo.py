"""``aimesh demo``: the mesh of ``aimesh up`` plus the pipeline run end to end on built-in data.

So far: ingest the demo digits (CSV from scikit-learn's bundled set, 4 shards) and the Python
standard library text corpus (byte-level tokens) and print their manifests; train a digits
classifier data-parallel on the two trainer nodes and the small language model pipeline-parallel
(two stages), and a second digits version (a CNN); deploy them, split digits 50/50 sticky by user,
classify digits through the HTTP gateway as several users (showing the variant each got), and
stream a completion from the LM through the OpenAI-compatible API; then run an experiment on
digits (v1 control, v2 candidate) with simulated user feedback in which v2 converts better, until
the metrics service's sequential test promotes v2; and print the dashboard and Prometheus URLs.
"""

from __future__ import annotations

import asyncio
import random
import sys

import msgspec
from nats.aio.client import Client as NatsClient

from aimesh.commands.mesh import connect_once
from aimesh.jobs import ingest, train
from aimesh.progress import manifest_text, render_report, version_text
from aimesh.supervisor import Supervisor
from shared.client import request
from shared.discovery import discover
from shared.errors import MeshError
from shared.experiments import put_split
from shared.names import Header, Names
from shared.registry import get_version, registry_kv
from shared.schemas import (
    Deployment,
    DeployRequest,
    ExperimentQuery,
    ExperimentReport,
    Guardrails,
    IngestRequest,
    MicroPing,
    Split,
    TrainRequest,
    Variant,
)

DEMO_TRAINING = (
    TrainRequest(
        model="digits",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 64, "classes": 10},
        dataset="digits",
        nodes=2,
        parallel="dp",
        epochs=10,
        batch_size=64,
        lr=3e-3,
    ),
    TrainRequest(
        model="digits",
        factory="zoo.classifier:cnn",
        kwargs={"side": 8, "classes": 10},
        dataset="digits",
        nodes=2,
        parallel="dp",
        epochs=10,
        batch_size=64,
        lr=3e-3,
    ),
    TrainRequest(
        model="pylm",
        factory="zoo.lm:causal_lm",
        kwargs={"vocab": 257, "dim": 64, "layers": 2, "heads": 4, "context": 128},
        dataset="pytext",
        nodes=2,
        parallel="pp",
        batch_size=16,
        microbatches=4,
        lr=3e-3,
        max_steps=40,
    ),
)
DEMO_SETS = (
    IngestRequest(paths=["demo:digits"], dataset="digits", shards=4),
    IngestRequest(paths=["demo:pytext"], dataset="pytext", shards=2, seq_len=128),
)


async def wait_for_service(nc: NatsClient, names: Names, service: str, count: int = 1, timeout_s: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name(service), wait_s=0.5)
        if sum(p.metadata.get("state") == "ready" for p in pings) >= count:
            return
        await asyncio.sleep(0.2)
    raise MeshError(f"fewer than {count} {service} services became ready within {timeout_s:g}s; see the log above")


async def _train(nc: NatsClient, names: Names) -> int:
    await wait_for_service(nc, names, "trainer", count=2)
    kv = await registry_kv(nc.jetstream(), names)
    for req in DEMO_TRAINING:
        print(
            f"\n== train {req.model}: {req.factory} on {req.dataset}, {req.parallel} over {req.nodes} nodes", flush=True
        )
        job = await train(nc, names, req, show=sys.stdout.isatty(), out=sys.stdout)
        if job.state != "complete":
            print(f"demo: training {req.model} failed: {job.error}", file=sys.stderr)
            return 1
        print(version_text(await get_version(kv, req.model, job.model_version)), flush=True)
    return 0


async def _serve(nc: NatsClient, names: Names) -> int:
    """Deploy both digits versions and the LM; split digits 50/50 sticky by user; call the HTTP
    gateway (Open Inference Protocol v2) as several users; stream a completion (OpenAI API)."""
    import aiohttp
    import numpy as np
    from sklearn.datasets import load_digits

    await wait_for_service(nc, names, "inference")
    for model, ref in (("digits", "1"), ("digits", "2"), ("pylm", "latest")):
        await request(nc, names.deploy, DeployRequest(model=model, ref=ref), Deployment)
    await put_split(
        nc.jetstream(),
        names,
        Split(
            model="digits", sticky="X-User", variants=[Variant(version="1", weight=50), Variant(version="2", weight=50)]
        ),
    )
    print(
        "\n== serve digits@1 (MLP) and digits@2 (CNN), split 50/50 sticky by X-User; pylm for completions", flush=True
    )
    base = await _gateway_when_serving(nc, names, {"digits@1", "digits@2", "pylm@1"})
    if not base:
        print("demo: the models did not come up on the inference workers", file=sys.stderr)
        return 1
    digits = load_digits()
    x, y = digits.data[-6:].astype(np.float32), digits.target[-6:]
    async with aiohttp.ClientSession() as http:
        print(f"POST {base}/v2/models/digits/infer  (one digit per user)")
        for i, user in enumerate(("ada", "bob", "cy", "dee", "eve", "fay")):
            body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x[i].tolist()}]}
            async with http.post(f"{base}/v2/models/digits/infer", json=body, headers={"X-User": user}) as resp:
                if resp.status != 200:
                    print(f"demo: inference failed: {resp.status} {await resp.text()}", file=sys.stderr)
                    return 1
                out = await resp.json()
                predicted = next(o for o in out["outputs"] if o["name"] == "class")["data"][0]
                print(
                    f"  user {user:<4} served by digits@{resp.headers[Header.VARIANT]}: true {y[i]}, "
                    f"predicted {predicted}"
                )
        prompt = "def main():"
        print(f"POST {base}/v1/completions  (stream: true)\n  {prompt}", end="", flush=True)
        completion: dict[str, object] = {
            "model": "pylm",
            "prompt": prompt,
            "max_tokens": 60,
            "temperature": 0.8,
            "seed": 1,
            "stream": True,
        }
        async with http.post(f"{base}/v1/completions", json=completion) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    print(msgspec.json.decode(line[6:])["choices"][0]["text"], end="", flush=True)
        print(flush=True)
    return 0


async def _gateway_when_serving(nc: NatsClient, names: Names, wanted: set[str], timeout_s: float = 60.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        workers = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
        routers = await discover(nc, "PING", MicroPing, name=names.micro_name("router"), wait_s=0.3)
        served = [set(w.metadata.get("serving", "").split(",")) for w in workers]
        if served and all(wanted <= s for s in served) and routers:
            await asyncio.sleep(0.5)  # the router follows the split bucket
            return routers[0].metadata.get("http", "")
        await asyncio.sleep(0.2)
    return ""


# Simulated users convert (reward 1) with these chances when a prediction is correct: v2 is better.
CONVERSION = {"1": 0.15, "2": 0.30}
EXPERIMENT_ROUNDS = 40  # at most this many rounds of 100 requests


async def _experiment(nc: NatsClient, names: Names) -> int:
    """An A/B experiment on digits: sticky by user, feedback from simulated users in which v2
    converts twice as often, until the sequential test promotes v2 (or the rounds run out)."""
    import aiohttp
    import numpy as np
    from sklearn.datasets import load_digits

    split = await put_split(
        nc.jetstream(),
        names,
        Split(
            model="digits",
            sticky="X-User",
            variants=[Variant(version="1", weight=50), Variant(version="2", weight=50)],
            control="1",
            guardrails=Guardrails(max_error_rate=0.05, min_samples=100, alpha=0.05),
        ),
    )
    print(
        f"\n== experiment {split.experiment} on digits: control v1, candidate v2, sticky by X-User; simulated users "
        f"convert with chance {CONVERSION['1']:.0%} (v1) / {CONVERSION['2']:.0%} (v2) on a correct prediction",
        flush=True,
    )
    base = await _gateway_when_serving(nc, names, {"digits@1", "digits@2"})
    await asyncio.sleep(1.0)  # every router follows the new split
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    rng = random.Random(7)
    report: ExperimentReport | None = None
    sent = 0
    async with aiohttp.ClientSession() as http:

        async def one(user: int) -> None:
            i = rng.randrange(len(x))
            body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x[i].tolist()}]}
            async with http.post(
                f"{base}/v2/models/digits/infer", json=body, headers={"X-User": f"user{user}"}
            ) as resp:
                if resp.status != 200:
                    return
                out = await resp.json()
            variant = resp.headers.get(Header.VARIANT, "")
            correct = next(o for o in out["outputs"] if o["name"] == "class")["data"][0] == y[i]
            reward = 1.0 if correct and rng.random() < CONVERSION.get(variant, 0.0) else 0.0
            await http.post(f"{base}/v1/feedback", json={"id": out["id"], "model": "digits", "reward": reward})

        for _ in range(EXPERIMENT_ROUNDS):
            await asyncio.gather(*(one(sent + k) for k in range(100)))
            sent += 100
            await asyncio.sleep(1.5)  # exposures are batched; the metrics service ticks every second
            try:
                report = await request(nc, names.experiments_query, ExperimentQuery(model="digits"), ExperimentReport)
            except MeshError:
                continue
            line = ", ".join(f"v{v.version}: {v.rewards} rewards, mean {v.reward_mean:.3f}" for v in report.variants)
            print(f"  {sent} requests  {line}  → {report.verdict}", flush=True)
            if report.verdict in ("promoted", "rolled_back"):
                break
    if report is None:
        print("demo: the metrics service did not report on the experiment", file=sys.stderr)
        return 1
    print(render_report(report), flush=True)
    return 0


async def _metrics_url(url: str | None, names: Names, nkey: str | None) -> str:
    if url is None:
        return ""
    nc = await connect_once(url, nkey=nkey, prefix=names.prefix)
    try:
        found = await discover(nc, "PING", MicroPing, name=names.micro_name("metrics"), wait_s=0.5)
    finally:
        await nc.close()
    return found[0].metadata.get("http", "") if found else ""


async def run_demo(supervisor: Supervisor, names: Names, stop: asyncio.Event, *, exit_when_done: bool) -> int:
    await supervisor.started.wait()
    assert supervisor.nats_url is not None
    code = 0
    nc = await connect_once(supervisor.nats_url, nkey=supervisor.seed("operator"), prefix=names.prefix)
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
        if not code:
            code = await _train(nc, names)
        if not code:
            code = await _serve(nc, names)
        if not code:
            code = await _experiment(nc, names)
    except MeshError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        await nc.close()
    metrics = await _metrics_url(supervisor.nats_url, names, supervisor.seed("operator"))
    if metrics:
        print(f"\ndashboard: {metrics}/   Prometheus: {metrics}/metrics", flush=True)
    print(
        f"NATS: {supervisor.nats_url}   status: aimesh status --data-dir {supervisor.data_dir}"
        f"   datasets: aimesh datasets --data-dir {supervisor.data_dir}"
        f"   models: aimesh models --data-dir {supervisor.data_dir}",
        flush=True,
    )
    if exit_when_done or code:
        stop.set()
    else:
        print("the mesh keeps running; Ctrl-C stops it", flush=True)
    return code
