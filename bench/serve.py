"""Serving throughput and latency, one model, the load generator in its own process.

    .venv/bin/python bench/serve.py [--seconds 5] [--rounds 3] [--overhead | --secure]

Model: MLP 256→1024→1024→10, float32, one torch thread per process.  Requests are Open
Inference Protocol v2 with the binary tensor extension (one 256-float row each).

(a) aimesh: HTTP gateway → NATS → 1 inference worker, dynamic batching;
(b) the same with 2 workers;
(c) in-process baseline: one aiohttp server calling the model directly, no batching;
(d) the model's offline throughput at batch 32 (the limit);
(e) the bare HTTP ceiling of the same server stack: aiohttp answering without a model;
and at concurrency 1, (a) with batching off (max batch 1) to show batching costs no latency;
(f) the metrics path's cost: (a) at concurrency 64 with tracing off and no metric snapshots,
    against the same with the metrics service running, snapshots every 2 s, tracing on
    (default sampling, spans to the metrics service) and the model under a split, so every
    request is also an experiment exposure.  ``--overhead`` runs only (f).
(g) ``--secure`` runs only this: (a) at concurrency 64 on an open NATS against a NATS that
    admits only the mesh's identities (one nkey per role, as ``aimesh up`` makes them) over TLS
    with a local CA; the gateway itself stays plain HTTP, so the figure is the bus's cost.

Rows rotate: each of ``--rounds`` rounds runs every row once, in the same order, and each figure
is the median of its row's rounds (as in ``bench/rpc.py``), so a machine that slows down or
speeds up during the run shifts every row alike instead of the last ones.  In (a)–(e) every
server stays up through all rounds, idle while another row runs; the second worker of (b) is
started for its row and drained after it.  (f) and (g) start a fresh NATS and fresh services for
every row of every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HIDDEN = [1024, 1024]
ROW = np.random.default_rng(0).random((1, 256), dtype=np.float32)
# As Triton's Python client sends by default: binary inputs, and binary outputs asked for.
HEADER = json.dumps(
    {
        "inputs": [
            {"name": "x", "shape": [1, 256], "datatype": "FP32", "parameters": {"binary_data_size": ROW.nbytes}}
        ],
        "parameters": {"binary_data_output": True},
    }
).encode()
BODY = HEADER + ROW.tobytes()


def _model() -> Any:
    import torch

    from zoo.classifier import mlp

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return mlp(inputs=256, classes=10, hidden=HIDDEN).eval()


# -- roles --------------------------------------------------------------------------------------
async def client(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = 0.0
    headers = {"Inference-Header-Content-Length": str(len(HEADER)), "Content-Type": "application/octet-stream"}

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < stop_at:
            try:
                async with http.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        latencies, errors = [], 0
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1e3 if n else 0.0,
        "p99_ms": latencies[min(int(n * 0.99), n - 1)] * 1e3 if n else 0.0,
        "errors": errors,
    }


async def inproc_server(port: int, with_model: bool) -> None:
    import torch
    from aiohttp import web

    from services.router import oip

    model = _model() if with_model else None

    async def infer(request: web.Request) -> web.Response:
        raw = await request.read()
        length = request.headers.get(oip.HEADER_LENGTH)
        body, inputs = oip.parse_request(raw, int(length) if length else None)
        if model is None:
            return web.json_response({"model_name": "echo", "outputs": []})
        with torch.inference_mode():
            logits = model(torch.from_numpy(inputs["x"].copy())).numpy()
        payload, json_length = oip.encode_response(
            model="mlp",
            version="1",
            request_id=body.id,
            outputs={"logits": logits, "class": logits.argmax(-1)},
            binary=oip.binary_outputs(body),
        )
        headers = {oip.HEADER_LENGTH: str(json_length)} if json_length is not None else {}
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)

    app = web.Application()
    app.router.add_post("/v2/models/mlp/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def offline_rate(seconds: float) -> float:
    import torch

    model = _model()
    x = torch.from_numpy(np.random.default_rng(1).random((32, 256), dtype=np.float32))
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += 32
    return n / (time.perf_counter() - start)


# -- orchestration ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_client(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--role",
            "client",
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def mesh_setup(url: str, operator: dict[str, str] | None = None) -> tuple[Any, str]:
    import nats

    from aimesh.demo import wait_for_service
    from shared.config import MeshConfig
    from shared.connect import connect_options
    from shared.registry import artifacts, put_object, register
    from shared.schemas import ColumnSpec, ModelVersion
    from zoo.artifacts import weights_to_bytes

    operator = operator or {}
    config = MeshConfig(
        nats_url=url,
        prefix="benchserve",
        nats_nkey=operator.get("AIMESH_NATS_NKEY"),
        nats_tls_ca=operator.get("AIMESH_NATS_TLS_CA"),
    )
    nc = await nats.connect(**connect_options(config, "bench", role="operator"))
    names = __import__("shared.names", fromlist=["Names"]).Names("benchserve")
    await wait_for_service(nc, names, "inference")
    await wait_for_service(nc, names, "router")
    js = nc.jetstream()
    store = await artifacts(js, names)
    await put_object(store, "models/mlp/bench.safetensors", weights_to_bytes(_model().state_dict()))
    version = ModelVersion(
        model="mlp",
        version="",
        artifact="models/mlp/bench.safetensors",
        factory="zoo.classifier:mlp",
        kwargs={"inputs": 256, "classes": 10, "hidden": HIDDEN},
        task="classify",
        dataset="-",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[256])],
    )
    await register(await js.key_value(names.registry_bucket), version)
    return nc, names


def median_row(samples: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds of one row."""
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


async def wait_workers(nc: Any, names: Any, workers: int) -> None:
    """Until exactly ``workers`` inference workers answer discovery (a drained one has left)."""
    from shared.discovery import discover
    from shared.schemas import MicroPing

    while len(await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)) != workers:
        await asyncio.sleep(0.2)


async def deploy(nc: Any, names: Any, max_batch: int, workers: int, split: bool = False, model: str = "mlp") -> str:
    """Deploy ``model`` (batch ≤ ``max_batch``, wait ≤ 2 ms); once at least ``workers`` workers
    serve it and a router answers, that router's infer URL for it."""
    from shared.client import request
    from shared.discovery import discover
    from shared.experiments import put_split
    from shared.schemas import Deployment, DeployRequest, MicroPing, Split, Variant

    await request(nc, names.deploy, DeployRequest(model=model, max_batch_size=max_batch, max_wait_ms=2), Deployment)
    if split:
        await put_split(nc.jetstream(), names, Split(model=model, variants=[Variant(version="1", weight=100)]))
    while True:
        pings = await discover(nc, "PING", MicroPing, name=names.micro_name("inference"), wait_s=0.3)
        routers = await discover(nc, "PING", MicroPing, name=names.micro_name("router"), wait_s=0.3)
        if len(pings) >= workers and all(f"{model}@" in p.metadata.get("serving", "") for p in pings) and routers:
            await asyncio.sleep(0.5)
            return routers[0].metadata["http"] + f"/v2/models/{model}/infer"
        await asyncio.sleep(0.2)


def start_service(service: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _mesh_rows(
    env: dict[str, str], services: tuple[str, ...], split: bool, seconds: float, secure: bool = False
) -> dict[str, float]:
    """Start ``services`` on a fresh NATS, deploy the model (under a split when asked), and load
    the gateway at concurrency 64.  ``secure``: the NATS admits only the roles' nkeys, over TLS."""
    from shared.natsserver import NatsServer

    work = Path(tempfile.mkdtemp(prefix="aimesh-bench-serve-"))
    role_env, extra = _secure_setup(work) if secure else ({}, [])
    with NatsServer(store_dir=work / "nats", http_port=None, extra_args=extra) as server:
        env = env | {"AIMESH_NATS_URL": server.url}
        procs = [start_service(s, env | role_env.get(s, {})) for s in services]
        try:
            loop = asyncio.new_event_loop()
            nc, names = loop.run_until_complete(mesh_setup(server.url, role_env.get("operator")))
            url = loop.run_until_complete(deploy(nc, names, max_batch=32, workers=1, split=split))
            result = run_client(url, 64, seconds)
            loop.run_until_complete(nc.close())
            return result
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)


def _secure_setup(work: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Each role's environment (its seed, the CA) and the server's arguments, as `aimesh up --tls`
    makes them."""
    from shared import auth
    from shared.names import Names
    from shared.tls import ensure_local_pki

    keys = auth.ensure_seeds(work / "auth")
    pki = ensure_local_pki(work / "tls")
    config = work / "nats-server.conf"
    tls = json.dumps({"cert_file": str(pki.cert), "key_file": str(pki.key)})
    config.write_text(auth.server_config(Names("benchserve"), keys) + f"tls: {tls}\n")
    role_env = {
        role: {"AIMESH_NATS_NKEY": str(auth.seed_path(work / "auth", role)), "AIMESH_NATS_TLS_CA": str(pki.ca)}
        for role in keys
    }
    return role_env, ["-c", str(config)]


def secure(env: dict[str, str], seconds: float, rounds: int) -> None:
    setups = (("open NATS", False), ("identities + TLS", True))
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _ in setups}
    for _ in range(rounds):
        for label, on in setups:  # alternated, so drift hits both rows alike
            samples[label].append(_mesh_rows(env, ("router", "inference"), False, seconds, secure=on))
    rows = {label: median_row(s) for label, s in samples.items()}
    print(f"\n  {'(g) bus security, concurrency 64':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for label, r in rows.items():
        print(f"  {label:<32} {r['rps']:>9,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6.0f}")
    ratio = rows["identities + TLS"]["rps"] / rows["open NATS"]["rps"]
    print(f"\n  secure / open throughput (medians over {rounds} round(s)): {ratio:.3f} (goal: cost under 5%)")


def overhead(env: dict[str, str], seconds: float, rounds: int) -> None:
    off = env | {"OTEL_SDK_DISABLED": "true", "AIMESH_METRICS_INTERVAL_S": "0"}
    on = {k: v for k, v in env.items() if k != "OTEL_SDK_DISABLED"} | {"AIMESH_TRACE_TO_MESH": "true"}
    setups = (
        ("off: no tracing, no snapshots", off, ("router", "inference"), False),
        ("on: metrics, tracing, split", on, ("router", "inference", "metrics"), True),
        ("off again", off, ("router", "inference"), False),
    )
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in setups}
    for _ in range(rounds):
        for label, run_env, services, split in setups:
            samples[label].append(_mesh_rows(run_env, services, split, seconds))
    rows = {label: median_row(s) for label, s in samples.items()}
    print(f"\n  {'(f) metrics path, concurrency 64':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for label, r in rows.items():
        print(f"  {label:<32} {r['rps']:>9,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6.0f}")
    off_rps = (rows["off: no tracing, no snapshots"]["rps"] + rows["off again"]["rps"]) / 2
    cost = 1 - rows["on: metrics, tracing, split"]["rps"] / off_rps
    print(
        f"\n  throughput cost of metrics + tracing: {cost:.1%} of the mean of the two off rows "
        f"(medians over {rounds} round(s); goal < 5%)"
    )


def bench_env() -> dict[str, str]:
    """The services' environment: tracing off, one torch thread per process, free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
    env.update(
        AIMESH_PREFIX="benchserve",
        OTEL_SDK_DISABLED="true",
        AIMESH_ROUTER_PORT="0",
        AIMESH_METRICS_PORT="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="bench", choices=["bench", "client", "inproc", "echo"])
    parser.add_argument("--url")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every row, rotated; medians shown")
    parser.add_argument("--overhead", action="store_true", help="only (f): metrics and tracing on versus off")
    parser.add_argument("--secure", action="store_true", help="only (g): identities and TLS on the bus versus off")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.role == "client":
        import uvloop

        print(json.dumps(uvloop.run(client(args.url, args.concurrency, args.seconds))))
        return
    if args.role in ("inproc", "echo"):
        import uvloop

        uvloop.run(inproc_server(args.port, with_model=args.role == "inproc"))
        return

    env = bench_env()
    print(
        f"serving benchmark: MLP 256→{'→'.join(map(str, HIDDEN))}→10, {args.seconds:g}s per row, "
        f"rounds: {args.rounds} (medians shown); {os.cpu_count()} cores"
    )
    if args.overhead:
        overhead(env, args.seconds, args.rounds)
        return
    if args.secure:
        secure(env, args.seconds, args.rounds)
        return
    compare(env, args.seconds, args.rounds)
    overhead(env, args.seconds, args.rounds)


def compare(env: dict[str, str], seconds: float, rounds: int) -> None:
    """Rows (a) to (e) side by side, ``rounds`` times rotated; medians printed with the goals."""
    from shared.natsserver import NatsServer

    samples: dict[str, dict[int, list[dict[str, float]]]] = {}
    offline: list[float] = []

    def sample(label: str, url: str, concurrencies: tuple[int, ...]) -> None:
        for c in concurrencies:
            samples.setdefault(label, {}).setdefault(c, []).append(run_client(url, c, seconds))

    with NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="aimesh-bench-serve-")), http_port=None) as server:
        env["AIMESH_NATS_URL"] = server.url
        procs: list[subprocess.Popen[Any]] = [start_service(s, env) for s in ("router", "inference")]
        baselines: list[tuple[str, str]] = []
        try:
            for role, label in (("inproc", "(c) in-process aiohttp + model"), ("echo", "(e) bare aiohttp, no model")):
                port = _free_port()
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--role", role, "--port", str(port)],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(proc)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                baselines.append((label, f"http://127.0.0.1:{port}/v2/models/mlp/infer"))

            loop = asyncio.new_event_loop()
            nc, names = loop.run_until_complete(mesh_setup(server.url))
            for _ in range(rounds):
                url = loop.run_until_complete(deploy(nc, names, max_batch=1, workers=1))
                sample("(a) batching off, 1 worker", url, (1,))
                url = loop.run_until_complete(deploy(nc, names, max_batch=32, workers=1))
                sample("(a) aimesh, 1 worker", url, (1, 64))
                second = start_service("inference", env)
                try:
                    url = loop.run_until_complete(deploy(nc, names, max_batch=32, workers=2))
                    sample("(b) aimesh, 2 workers", url, (1, 64))
                finally:
                    second.terminate()
                    second.wait(30)
                loop.run_until_complete(wait_workers(nc, names, 1))
                for label, url in baselines:
                    sample(label, url, (1, 64))
                offline.append(offline_rate(seconds))
            loop.run_until_complete(nc.close())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    rows = {label: {c: median_row(runs) for c, runs in by_conc.items()} for label, by_conc in samples.items()}
    offline_median = statistics.median(offline)

    print(f"\n  {'':<32} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for label, by_conc in rows.items():
        for conc, r in by_conc.items():
            print(
                f"  {label:<32} {conc:>4} {r['rps']:>9,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6.0f}"
            )
    print(f"  {'(d) offline, batch 32':<32} {'':>4} {offline_median:>9,.0f}  (samples/s)")
    a64, c64 = rows["(a) aimesh, 1 worker"][64]["rps"], rows["(c) in-process aiohttp + model"][64]["rps"]
    e64 = rows["(e) bare aiohttp, no model"][64]["rps"]
    p50_on, p50_off = rows["(a) aimesh, 1 worker"][1]["p50_ms"], rows["(a) batching off, 1 worker"][1]["p50_ms"]
    b64 = rows["(b) aimesh, 2 workers"][64]["rps"]
    print(
        f"\n  at 64: (a)/(c) = {a64 / c64:.2f} (goal ≥ 2)   (a)/(e) = {a64 / e64:.2f} (goal ≥ 0.4)   "
        f"(b)/(a) = {b64 / a64:.2f}"
    )
    print(f"  at 1: p50 with batching / without = {p50_on / p50_off:.2f} (goal ≤ 1.2)")


if __name__ == "__main__":
    main()
