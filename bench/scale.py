"""Scale by simulation: N inference workers whose forward pass is a fixed device time, behind one
router and then two; throughput against the ideal line, queue-group fairness, router saturation.

    .venv/bin/python bench/scale.py [--workers 1 2 4 8 16 32] [--routers 1 2] [--seconds 4]
                                    [--device-ms 20] [--max-batch 8] [--slots 3]
                                    [--plot-python PATH] [--out docs/scale.md | --no-write]

Smoke test (about a minute): ``--workers 1 2 --seconds 1 --no-write``.

Model: ``zoo.sim:fixed_time`` (``zoo/sim.py``), whose forward pass sleeps ``--device-ms`` per
batch whatever its size and answers zeros: a stand-in for a GPU kernel.  ``time.sleep`` releases
the GIL, so a worker's CPU is not its limit; one worker can answer at most ``max_batch`` rows per
``device_ms``, and N workers N times that: the ideal line, ``N × max_batch / device time``.

Requests and load generator: ``bench/serve.py``'s (one 256-float row per request, OIP binary
body, its client), in one process of its own; with two routers the one load generator splits its
connections between them.  The load is closed-loop, so the concurrency sets what can be reached:
at most ``concurrency / device time`` if every request took one pass and nothing else.  It is
``slots × N × max_batch`` (default 3: per worker one full batch in its pass, the next full one
waiting in its queue, one more on the way), capped by ``--max-concurrency``; the ideal printed is
``min(N × max_batch, concurrency) / device time``.

Services: ``bench/serve.py``'s environment (tracing off, one torch thread per process), one
NATS, every router up from the start (an idle router costs nothing), the workers started in
parallel as N grows (``python -m services.inference``) and waited for until every one serves the
model.  For each N, each router count is measured once: the client's figures, then

- fairness: requests per worker in the window (each worker's ``infer-sim-1`` actor, read from
  ``$SRV.STATS`` discovery before and after): the row counts of the workers' batchers (one row =
  one HTTP request; the router coalesces requests into one NATS message), as min and max over
  the mean, and the coefficient of variation;
- CPU from ``/proc/<pid>/stat`` over the measured window (``bench/peers.py``): per request, for
  the routers, NATS, all workers and the load generator; and the busiest router's share of one
  core (a router is one event loop: near 100 % it is saturated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import serve  # noqa: E402
from bench.peers import WARMUP_S, Group, cpu_delta, cpu_sample, replace_section, wait_quiet  # noqa: E402

MODEL = "sim"
OUTPUTS = 10
SATURATED = 0.9  # below this share of the ideal, a point counts as saturated
MARK_BEGIN = "<!-- bench/scale.py: begin -->"
MARK_END = "<!-- bench/scale.py: end -->"
CHART = "scale.png"
DEFAULT_WORKERS = [1, 2, 4, 8, 16, 32]


# -- the load generator (its own process) -------------------------------------------------------
async def client(urls: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """``bench/serve.py``'s client on each URL at once, the connections split evenly; summed
    throughput, the worst p50 and p99 of the parts."""
    shares = [concurrency // len(urls) + (i < concurrency % len(urls)) for i in range(len(urls))]
    parts = await asyncio.gather(*(serve.client(url, c, seconds) for url, c in zip(urls, shares, strict=True)))
    return {
        "rps": sum(p["rps"] for p in parts),
        "p50_ms": max(p["p50_ms"] for p in parts),
        "p99_ms": max(p["p99_ms"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
    }


# -- the mesh -----------------------------------------------------------------------------------
async def register_sim(nc: Any, names: Any, device_ms: float) -> None:
    """Register ``zoo.sim:fixed_time`` as model ``sim`` (no weights: an empty safetensors file)."""
    from shared.registry import artifacts, put_object, register
    from shared.schemas import ColumnSpec, ModelVersion
    from zoo.artifacts import weights_to_bytes

    inputs = int(serve.ROW.shape[1])
    store = await artifacts(nc.jetstream(), names)
    await put_object(store, "models/sim/bench.safetensors", weights_to_bytes({}))
    version = ModelVersion(
        model=MODEL,
        version="",
        artifact="models/sim/bench.safetensors",
        factory="zoo.sim:fixed_time",
        kwargs={"inputs": inputs, "outputs": OUTPUTS, "device_ms": device_ms},
        task="classify",
        dataset="-",
        inputs=[ColumnSpec(name="x", dtype="float32", shape=[inputs])],
    )
    await register(await nc.jetstream().key_value(names.registry_bucket), version)


async def wait_routers(nc: Any, names: Any, count: int) -> None:
    """Until ``count`` routers answer discovery."""
    from shared.discovery import discover
    from shared.schemas import MicroPing

    while len(await discover(nc, "PING", MicroPing, name=names.micro_name("router"), wait_s=1.0, settle_s=0.3)) < count:
        await asyncio.sleep(0.2)


async def worker_rows(nc: Any, names: Any, workers: int) -> dict[str, tuple[int, int, int]]:
    """Each worker's (rows, NATS requests, forward passes) so far on the sim model, by instance id."""
    from shared.discovery import discover
    from shared.schemas import MicroStats

    actor = f"infer-{MODEL}-1"
    for _ in range(10):
        stats = await discover(nc, "STATS", MicroStats, name=names.micro_name("inference"), wait_s=3.0, settle_s=0.5)
        out = {}
        for s in stats:
            for e in s.endpoints:
                if e.name == actor:  # its batcher's rows and passes, whichever subject they came on
                    data = e.data or {}
                    # NATS requests on the queue group's subject and on the worker's own (hedges)
                    direct = sum(d.num_requests for d in s.endpoints if d.name == f"{actor}-direct")
                    out[s.id] = (int(data.get("batch_rows", 0)), e.num_requests + direct, int(data.get("batches", 0)))
        if len(out) == workers:
            return out
    raise RuntimeError(f"{len(out)} of {workers} workers answered $SRV.STATS for {actor}")


@dataclass
class Mesh:
    """NATS, the routers and the workers, as started; the asyncio loop that talks to them."""

    env: dict[str, str]
    nats_pid: int
    routers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # each router's HTTP port, in the same order
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    nc: Any = None
    names: Any = None

    def grow(self, workers: int, max_batch: int) -> float:
        """Start workers (in parallel) until there are ``workers``; seconds until all serve."""
        start = time.perf_counter()
        self.workers += [serve.start_service("inference", self.env) for _ in range(workers - len(self.workers))]
        waiting = serve.deploy(self.nc, self.names, max_batch, workers, model=MODEL)
        self.loop.run_until_complete(asyncio.wait_for(waiting, 300))
        if dead := [p.pid for p in self.workers + self.routers if p.poll() is not None]:
            raise RuntimeError(f"processes exited: {dead}")
        return time.perf_counter() - start

    def start_routers(self, count: int) -> None:
        """``count`` routers, each on a port of its own (router i's CPU is the one its URL loads)."""
        self.ports = [serve._free_port() for _ in range(count)]
        self.routers = [serve.start_service("router", self.env | {"AIMESH_ROUTER_PORT": str(p)}) for p in self.ports]

    def urls(self, count: int) -> list[str]:
        return [f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer" for port in self.ports[:count]]

    def groups(self) -> list[Group]:
        routers = [Group(f"router {i + 1}", p.pid) for i, p in enumerate(self.routers)]
        return [*routers, Group("nats", self.nats_pid), *(Group("workers", p.pid) for p in self.workers)]

    def close(self) -> None:
        if self.nc is not None:
            self.loop.run_until_complete(self.nc.close())
        for p in self.workers + self.routers:
            p.terminate()
        for p in self.workers + self.routers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.loop.close()


# -- one measurement ----------------------------------------------------------------------------
def measure(mesh: Mesh, routers: int, workers: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """The load generator on ``routers`` routers; its figures, CPU and the workers' shares."""
    urls = mesh.urls(routers)
    _, busy = wait_quiet(0)
    counts0 = mesh.loop.run_until_complete(worker_rows(mesh.nc, mesh.names, workers))
    argv = [sys.executable, __file__, "--role", "client", "--urls", *urls]
    load = subprocess.Popen(
        [*argv, "--concurrency", str(concurrency), "--seconds", str(seconds)], stdout=subprocess.PIPE
    )
    assert load.stdout is not None
    if load.stdout.readline().strip() != b"go":
        load.wait()
        raise RuntimeError("the load generator did not start")
    groups = [*mesh.groups(), Group("client", load.pid)]
    time.sleep(WARMUP_S)  # serve.client's warm-up: the window is off by the requests in flight
    before = cpu_sample(groups)
    time.sleep(seconds)
    after = cpu_sample(groups)
    out, _ = load.communicate()
    if load.returncode != 0:
        raise RuntimeError(f"the load generator failed with code {load.returncode}")
    counts1 = mesh.loop.run_until_complete(worker_rows(mesh.nc, mesh.names, workers))
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["cpu_s"] = cpu_delta(before, after)
    zero = (0, 0, 0)
    result["rows"] = [counts1[k][0] - counts0.get(k, zero)[0] for k in sorted(counts1)]
    result["messages"] = sum(counts1[k][1] - counts0.get(k, zero)[1] for k in counts1)
    result["batches"] = sum(counts1[k][2] - counts0.get(k, zero)[2] for k in counts1)
    result["busy"] = busy
    return result


def figures(
    raw: dict[str, Any], routers: int, workers: int, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One table row from one measurement."""
    ideal = min(workers * args.max_batch, concurrency) / (args.device_ms / 1000)
    requests = max(raw["rps"] * args.seconds, 1.0)
    cpu = raw["cpu_s"]
    router_cpu = [cpu.get(f"router {i + 1}", 0.0) for i in range(routers)]
    rows = raw["rows"]
    mean = statistics.fmean(rows) if rows else 0.0
    return {
        "routers": routers,
        "workers": workers,
        "concurrency": concurrency,
        "ideal": ideal,
        "rps": raw["rps"],
        "p50_ms": raw["p50_ms"],
        "p99_ms": raw["p99_ms"],
        "errors": raw["errors"],
        "min_share": min(rows) / mean if mean else 0.0,
        "max_share": max(rows) / mean if mean else 0.0,
        "cv": statistics.pstdev(rows) / mean if mean else 0.0,
        "rows_per_message": sum(rows) / max(raw["messages"], 1),
        "rows_per_batch": sum(rows) / max(raw["batches"], 1),
        "cores": sum(cpu.values()) / args.seconds,
        "router_us": sum(router_cpu) / requests * 1e6,
        "router_core": max(router_cpu) / args.seconds,
        "nats_us": cpu.get("nats", 0.0) / requests * 1e6,
        "workers_us": cpu.get("workers", 0.0) / requests * 1e6,
        "client_us": cpu.get("client", 0.0) / requests * 1e6,
        "busy": raw["busy"],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from shared.natsserver import NatsServer

    results: list[dict[str, Any]] = []
    with NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="aimesh-bench-scale-")), http_port=None) as server:
        assert server.process is not None
        env = serve.bench_env() | {"AIMESH_NATS_URL": server.url}
        mesh = Mesh(env, server.process.pid)
        try:
            mesh.start_routers(max(args.routers))
            mesh.workers = [serve.start_service("inference", env)]
            mesh.nc, mesh.names = mesh.loop.run_until_complete(serve.mesh_setup(server.url))
            mesh.loop.run_until_complete(wait_routers(mesh.nc, mesh.names, len(mesh.routers)))
            mesh.loop.run_until_complete(register_sim(mesh.nc, mesh.names, args.device_ms))
            for workers in sorted(set(args.workers)):
                took = mesh.grow(workers, args.max_batch)
                print(f"  {workers} worker(s) serving ({took:.1f} s to start and load)", flush=True)
                concurrency = min(args.slots * workers * args.max_batch, args.max_concurrency)
                for routers in sorted(set(args.routers)):
                    raw = measure(mesh, routers, workers, concurrency, args.seconds)
                    results.append(row := figures(raw, routers, workers, concurrency, args))
                    print("  " + " | ".join(table_row(row)), flush=True)
        finally:
            mesh.close()
    return results


# -- reporting ----------------------------------------------------------------------------------
HEADER = [
    "routers",
    "workers",
    "conc",
    "ideal req/s",
    "req/s",
    "of ideal",
    "p50 ms",
    "p99 ms",
    "errors",
    "rows/worker min–max ÷ mean (CV)",
    "rows per NATS msg",
    "rows per pass",
    "router µs/req",
    "busiest router, share of a core",
    "nats µs/req",
    "workers µs/req",
    "client µs/req",
    "cores used, all measured",
    "machine busy before",
]


def table_row(r: dict[str, Any]) -> list[str]:
    return [
        str(r["routers"]),
        str(r["workers"]),
        str(r["concurrency"]),
        f"{r['ideal']:,.0f}",
        f"{r['rps']:,.0f}",
        f"{r['rps'] / r['ideal']:.0%}",
        f"{r['p50_ms']:.1f}",
        f"{r['p99_ms']:.1f}",
        f"{r['errors']:.0f}",
        f"{r['min_share']:.2f}–{r['max_share']:.2f} ({r['cv']:.2f})",
        f"{r['rows_per_message']:.1f}",
        f"{r['rows_per_batch']:.1f}",
        f"{r['router_us']:,.0f}",
        f"{r['router_core']:.0%}",
        f"{r['nats_us']:,.0f}",
        f"{r['workers_us']:,.0f}",
        f"{r['client_us']:,.0f}",
        f"{r['cores']:.2f}",
        f"{r['busy']:.0%}",
    ]


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(" ---: " for _ in HEADER) + "|"]
    return lines + ["| " + " | ".join(table_row(r)) + " |" for r in results]


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def saturation(results: list[dict[str, Any]]) -> list[str]:
    """Per router count: the best throughput, and the first N below SATURATED of the ideal."""
    lines = []
    for routers in sorted({r["routers"] for r in results}):
        rows = [r for r in results if r["routers"] == routers]
        best = max(rows, key=lambda r: r["rps"])
        below = next((r for r in rows if r["rps"] < SATURATED * r["ideal"]), None)
        where = (
            f"first below {SATURATED:.0%} of the ideal at {plural(below['workers'], 'worker')} "
            f"({below['rps']:,.0f} of {below['ideal']:,.0f} req/s, "
            f"busiest router at {below['router_core']:.0%} of a core)"
            if below
            else f"every point within {SATURATED:.0%} of the ideal"
        )
        lines.append(
            f"- {plural(routers, 'router')}: best {best['rps']:,.0f} req/s at {plural(best['workers'], 'worker')} "
            f"(busiest router at {best['router_core']:.0%} of a core); {where}"
        )
    return lines


def draw_chart(data: list[dict[str, Any]], png: str) -> None:
    """Throughput and the ideal against workers; the busiest router's share of a core."""
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ideal = {r["workers"]: r["ideal"] for r in data}
    left.plot(list(ideal), list(ideal.values()), "k--", label="ideal: N × batch / device time")
    for routers in sorted({r["routers"] for r in data}):
        rows = [r for r in data if r["routers"] == routers]
        left.plot([r["workers"] for r in rows], [r["rps"] for r in rows], "o-", label=f"{routers} router(s)")
        right.plot(
            [r["workers"] for r in rows], [100 * r["router_core"] for r in rows], "o-", label=f"{routers} router(s)"
        )
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ideal), [str(w) for w in sorted(ideal)])
        ax.set_xlabel("inference workers")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    left.set_ylabel("requests per second")
    right.set_ylabel("busiest router's CPU, % of one core")
    right.set_ylim(0, 110)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def chart(results: list[dict[str, Any]], png: Path, python: str | None) -> bool:
    """Drawn by this interpreter if it has matplotlib, else by ``python`` if given."""
    try:
        draw_chart(results, str(png))
        return True
    except ImportError:
        if python is None:
            return False
    argv = [python, __file__, "--role", "chart", "--data", json.dumps(results), "--png", str(png)]
    return subprocess.run(argv, check=False).returncode == 0


def write_doc(out: Path, header: list[str], body: list[str], png: Path | None) -> None:
    caption = "throughput and router CPU against inference workers"
    replace_section(out, (MARK_BEGIN, MARK_END), header, body, png, caption, "# Scale\n")


def report(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    header = [
        f"`{command}`, {time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores shared by every "
        f"process (NATS, routers, workers, load generator): device time {args.device_ms:g} ms per batch, "
        f"batch ≤ {args.max_batch} rows (wait ≤ 2 ms), {args.seconds:g} s measured per point after "
        f"{WARMUP_S:g} s of warm-up, one run per point; concurrency = min({args.slots} × workers × batch, "
        f"{args.max_concurrency})."
    ]
    lines, sat = table(results), saturation(results)
    print("\n" + "\n".join([*header, "", *lines, "", *sat]))
    if args.no_write:
        return
    out = Path(args.out)
    png = out.parent / CHART
    drawn = chart(results, png, args.plot_python)
    if not drawn:
        print("  no chart: matplotlib imports neither here nor in --plot-python")
    write_doc(out, header, [*lines, "", *sat], png if drawn else None)
    print(f"\n  wrote {out}" + (f" and {png}" if drawn else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="bench", choices=["bench", "client", "chart"])
    parser.add_argument("--workers", type=int, nargs="+", default=DEFAULT_WORKERS, help="worker counts to measure")
    parser.add_argument("--routers", type=int, nargs="+", default=[1, 2], help="router counts to measure")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--device-ms", type=float, default=40.0, help="the model's sleep per forward pass")
    parser.add_argument("--max-batch", type=int, default=4, help="the deployment's max batch size")
    parser.add_argument("--slots", type=int, default=3, help="client concurrency per worker, in batches")
    parser.add_argument("--max-concurrency", type=int, default=1024, help="cap on the client's connections")
    parser.add_argument("--plot-python", help="an interpreter with matplotlib, if this one has none")
    parser.add_argument("--out", default=str(ROOT / "docs" / "scale.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; write no doc or chart")
    parser.add_argument("--urls", nargs="+", default=[])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--data")
    parser.add_argument("--png")
    args = parser.parse_args()
    if args.role == "client":
        import uvloop

        print("go", flush=True)
        print(json.dumps(uvloop.run(client(args.urls, args.concurrency, args.seconds))))
        return
    if args.role == "chart":
        draw_chart(json.loads(args.data), args.png)
        return
    if min(args.workers) < 1 or min(args.routers) < 1 or args.device_ms <= 0 or args.max_batch < 1:
        parser.error("workers, routers, --device-ms and --max-batch must be positive")
    command = "python bench/scale.py " + " ".join(sys.argv[1:])
    print(f"scale benchmark: {os.cpu_count()} cores; workers {args.workers}, routers {args.routers}", flush=True)
    report(run(args), args, command)


if __name__ == "__main__":
    main()
