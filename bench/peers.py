"""aimesh against its peers: the same model behind FastAPI, LitServe, Ray Serve, a one-file
prototype and aimesh, one load generator, CPU per request per process.

    .venv/bin/python bench/peers.py [--seconds 5] [--rounds 3] [--only ROW ...] [--peers-python PATH]
                                    [--quiet-wait 30] [--out docs/performance.md | --no-write]

The peers come from the optional extra: ``pip install -e '.[peers]'`` (into this venv, or into
another one named by ``--peers-python``, which then runs the peers' servers).  A peer whose
packages the peers' interpreter lacks, or that does not start, is skipped with a line saying so.
Smoke test (about 3 minutes): ``--seconds 1 --rounds 1 --quiet-wait 2 --no-write``.

Model: ``bench/serve.py``'s MLP 256→1024→1024→10, one torch thread per process.  Rows:

  ceiling          bare aiohttp parsing the OIP body and answering without a model (bench/serve.py)
  fastapi          FastAPI under uvicorn, the model called in the handler (no batching)
  litserve         LitServe, batch 32 / 5 ms, one inference worker (it reads JSON bodies only)
  ray              Ray Serve, ``serve.batch`` 32 / 5 ms, one replica
  prototype        bench/prototype.py: aiohttp gateway → NATS → greedy-batching worker (≤ 32)
  aimesh-json      aimesh's router → NATS → 1 inference worker, OIP JSON body, batch 32 / 2 ms
  aimesh-binary    the same, OIP binary body
  aimesh-2workers  the same with 2 inference workers, binary body
  aimesh-json-single, aimesh-binary-single
                   the same rows through a second router with coalescing off
                   (``[router] coalesce = false``: one NATS request per HTTP request)

The mesh is set up as in ``bench/serve.py`` (tracing off, metric snapshots every 2 s).  Every
server starts once, in its own process(es), and stays up, idle while other rows run.  Each of
``--rounds`` rounds measures every row at concurrency 1 and 64, the row order rotated by one each
round; figures are medians over rounds.  The load generator is ``bench/serve.py``'s client, in a
process of its own.  Server CPU is utime + stime (+ reaped children's) from ``/proc/<pid>/stat``
over the measured window, per process (whole process trees for LitServe and Ray, which start
processes of their own), divided by the requests answered in it.  Before each measurement the
script waits (at most ``--quiet-wait`` s) for a quiet machine and notes it when none came.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import serve  # noqa: E402
from bench.prototype import HEADER_LENGTH, encode_binary, parse_binary  # noqa: E402

PATH = "/v2/models/mlp/infer"
MAX_BATCH = 32
PEER_WAIT_S = 0.005  # the peers' batch wait (aimesh's is bench/serve.py's 2 ms)
CONCURRENCIES = (1, 64)
WARMUP_S = 1.0  # serve.client's warm-up before its measured window
QUIET_BUSY = 0.15  # a machine at most this busy (share of all cores) counts as quiet
JSON_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": list(serve.ROW.shape), "datatype": "FP32", "data": serve.ROW.ravel().tolist()}]}
).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK_BEGIN = "<!-- bench/peers.py: begin -->"
MARK_END = "<!-- bench/peers.py: end -->"
CHART = "performance-peers.png"


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    body: str  # "binary" or "json": what the load generator sends
    modules: tuple[str, ...] = ()  # what the peers' interpreter must import; () runs in this venv


ROWS = {
    r.name: r
    for r in (
        Row("ceiling", "bare aiohttp, constant answer (ceiling)", "binary"),
        Row("fastapi", "FastAPI + model in process", "binary", ("fastapi", "uvicorn", "torch")),
        Row("litserve", "LitServe, batch 32 / 5 ms", "json", ("litserve", "torch")),
        Row("ray", "Ray Serve, serve.batch 32 / 5 ms", "binary", ("ray.serve", "starlette", "torch")),
        Row("prototype", "prototype: aiohttp → NATS → greedy worker", "binary"),
        Row("aimesh-json", "aimesh, OIP JSON", "json"),
        Row("aimesh-binary", "aimesh, OIP binary", "binary"),
        Row("aimesh-2workers", "aimesh, 2 workers (binary)", "binary"),
        Row("aimesh-json-single", "aimesh, OIP JSON, coalescing off", "json"),
        Row("aimesh-binary-single", "aimesh, OIP binary, coalescing off", "binary"),
    )
}
INSTALL_HINT = "pip install -e '.[peers]'"


# -- CPU from /proc -----------------------------------------------------------------------------
@dataclass
class Group:
    """A process whose CPU is counted under ``label``; ``tree``: with all its descendants, each
    descendant counted under ``label/<its name>``."""

    label: str
    pid: int
    tree: bool = False


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(name, parent pid, CPU seconds including reaped children) of a live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): utime, stime, cutime, cstime are fields 14–17.
    return name, int(rest[1]), sum(int(v) for v in rest[11:15]) / CLK_TCK


def _name(pid: int, comm: str) -> str:
    """A tree member's name: its program (Ray's actors name themselves ``ray::Actor...``; the
    kernel's ``comm`` is cut at 15 characters), and whether multiprocessing spawned it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return comm
    name = os.path.basename(argv[0].decode(errors="replace")).split(" ")[0] or comm
    if name.startswith("ray::"):
        name = name.split(".")[0]  # "ray::ProxyActor.receive_asgi_messages": the task it runs now
    return f"{name} (spawned)" if any(b"spawn_main" in a for a in argv) else name[:32]


def cpu_sample(groups: list[Group]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every counted process: pid → (label, seconds)."""
    out: dict[int, tuple[str, float]] = {}
    children: dict[int, list[int]] = {}
    if any(g.tree for g in groups):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(int(entry))):
                children.setdefault(st[1], []).append(int(entry))
    for g in groups:
        todo = [g.pid]
        while todo:
            pid = todo.pop()
            if (st := _stat(pid)) is None:
                continue
            out[pid] = (g.label if pid == g.pid or not g.tree else f"{g.label}/{_name(pid, st[0])}", st[2])
            if g.tree:
                todo += children.get(pid, [])
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two samples, by label (per pid first: Ray's actors retitle
    themselves with the task they run, so a label may change within the window)."""
    out: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        out[label] = out.get(label, 0.0) + seconds - before.get(pid, (label, 0.0))[1]
    return out


def _busy(sample_s: float) -> float:
    """The share of all cores busy over ``sample_s`` (from /proc/stat)."""

    def read() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = read()
    time.sleep(sample_s)
    total1, idle1 = read()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(limit_s: float) -> tuple[bool, float]:
    """Until the CPUs are mostly idle (a 0.5 s /proc/stat sample, or the 1-minute load average),
    at most ``limit_s``: (whether it got quiet, the last busy share seen)."""
    deadline = time.monotonic() + limit_s
    while True:
        busy = _busy(0.5)
        load = float(Path("/proc/loadavg").read_text().split()[0]) / (os.cpu_count() or 1)
        if busy <= QUIET_BUSY or load <= QUIET_BUSY:
            return True, busy
        if time.monotonic() >= deadline:
            return False, busy


# -- running the systems ------------------------------------------------------------------------
def _wait_answering(url: str, body: str, proc: subprocess.Popen[Any] | None, timeout_s: float) -> None:
    """Until ``url`` answers the load generator's own request with 200 (so a server that starts
    but cannot serve fails here, not in the figures)."""
    data = JSON_BODY if body == "json" else serve.BODY
    header_length = len(data) if body == "json" else len(serve.HEADER)
    request = urllib.request.Request(
        url,
        data=data,
        headers={HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code != 404:  # a refusal (Ray's proxy: 404 until the app is up)
                raise RuntimeError(f"{url} answered {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


@dataclass
class Running:
    """A started system: where to send load, what to count, how to prepare a round's row."""

    url: str
    groups: list[Group]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    enter: Callable[[], None] = lambda: None  # before each round's measurements
    leave: Callable[[], None] = lambda: None  # after them


def _log_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"aimesh-bench-peers-{name}.log"


def _spawn(argv: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
    # A session of its own, so that stop() can kill the whole group (Ray's and LitServe's
    # processes included); output to a log that a failed start names.
    with _log_path(log_name).open("wb") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _started(running: Running, body: str, timeout_s: float, logs: list[str]) -> Running:
    """``running`` once it answers; stopped, and an error naming its logs, if it does not."""
    try:
        _wait_answering(running.url, body, running.procs[0], timeout_s)
    except RuntimeError as exc:
        stop(running)
        raise RuntimeError(f"{exc} (logs: {', '.join(str(_log_path(n)) for n in logs)})") from None
    return running


def start_peer(row: Row, python: str, env: dict[str, str]) -> Running:
    """A peer's or the ceiling's server (one process tree), answering before this returns."""
    port = serve._free_port()
    if row.name == "ceiling":
        argv = [sys.executable, str(ROOT / "bench" / "serve.py"), "--role", "echo", "--port", str(port)]
    else:
        argv = [python, __file__, "--role", row.name, "--port", str(port)]
    proc = _spawn(argv, env, row.name)
    group = Group(row.name, proc.pid, tree=row.name in ("litserve", "ray"))
    return _started(Running(f"http://127.0.0.1:{port}{PATH}", [group], [proc]), row.body, 180.0, [row.name])


def start_prototype(nats_url: str, env: dict[str, str], nats_pid: int) -> Running:
    script = str(ROOT / "bench" / "prototype.py")
    worker = _spawn([sys.executable, script, "worker", "--nats", nats_url], env, "prototype-worker")
    port = serve._free_port()
    gateway = _spawn(
        [sys.executable, script, "gateway", "--nats", nats_url, "--port", str(port)], env, "prototype-gateway"
    )
    groups = [Group("gateway", gateway.pid), Group("worker", worker.pid), Group("nats", nats_pid)]
    running = Running(f"http://127.0.0.1:{port}{PATH}", groups, [gateway, worker])
    return _started(running, "binary", 60.0, ["prototype-gateway", "prototype-worker"])


class Mesh:
    """aimesh's router and one inference worker on ``nats_url``, deployed as bench/serve.py does;
    a second worker is started for the 2-worker row and drained after it."""

    def __init__(self, nats_url: str, env: dict[str, str]) -> None:
        self.env = env
        self.router = serve.start_service("router", env)
        self.worker = serve.start_service("inference", env)
        self.second: subprocess.Popen[bytes] | None = None
        self.single: subprocess.Popen[bytes] | None = None  # a router with coalescing off
        self.single_url = ""
        self.loop = asyncio.new_event_loop()
        try:
            self.nc, self.names = self.loop.run_until_complete(serve.mesh_setup(nats_url))
            self.url = self.deploy(1)
        except BaseException:
            self._stop_services()
            raise

    def deploy(self, workers: int) -> str:
        url: str = self.loop.run_until_complete(serve.deploy(self.nc, self.names, max_batch=MAX_BATCH, workers=workers))
        return url

    def row(self, workers: int, nats_pid: int, *, coalesce: bool = True) -> Running:
        router = self.router if coalesce else self._single_router()
        url = self.url if coalesce else self.single_url
        groups = [Group("router", router.pid), Group("worker", self.worker.pid), Group("nats", nats_pid)]
        if workers == 1:
            return Running(url, groups, enter=self._one)  # redeployed: the 2-worker row may have run
        running = Running(self.url, groups)

        def enter() -> None:
            self.second = serve.start_service("inference", self.env)
            running.groups.insert(2, Group("worker 2", self.second.pid))
            self.deploy(2)

        def leave() -> None:
            del running.groups[2]
            if self.second is not None:
                self.second.terminate()
                self.second.wait(30)
                self.second = None
            self.loop.run_until_complete(serve.wait_workers(self.nc, self.names, 1))

        running.enter, running.leave = enter, leave
        return running

    def _single_router(self) -> subprocess.Popen[bytes]:
        if self.single is None:
            port = serve._free_port()
            self.single = serve.start_service(
                "router", self.env | {"AIMESH_ROUTER_COALESCE": "false", "AIMESH_ROUTER_PORT": str(port)}
            )
            self.single_url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
            _wait_answering(self.single_url, "binary", self.single, 60)
        return self.single

    def _one(self) -> None:
        self.deploy(1)

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self._stop_services()

    def _stop_services(self) -> None:
        self.loop.close()
        for p in (self.router, self.worker, self.second, self.single):
            if p is not None:
                p.terminate()
        for p in (self.router, self.worker, self.second, self.single):
            if p is not None:
                p.wait(30)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            children.setdefault(st[1], []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def stop(running: Running) -> None:
    """SIGTERM to each server (Ray's driver shuts Ray down on it), then SIGKILL after 30 s to
    whatever is left of its process group and of the descendants it had."""
    trees = {p.pid: _descendants(p.pid) for p in running.procs}
    for p in running.procs:
        p.terminate()
    deadline = time.monotonic() + 30
    for p in running.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(deadline - time.monotonic(), 0.1))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        for pid in trees[p.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


# -- measuring ----------------------------------------------------------------------------------
def measure(running: Running, body: str, concurrency: int, seconds: float, quiet_wait: float) -> dict[str, float]:
    """One run of the load generator, with the servers' CPU over its measured window."""
    quiet, busy = wait_quiet(quiet_wait)
    argv = [sys.executable, __file__, "--role", "client", "--url", running.url, "--body", body]
    argv += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "go":
        client.wait()
        raise RuntimeError("the load generator did not start")
    # serve.client warms up for WARMUP_S, then measures for ``seconds``: the window here is off
    # by at most the requests in flight at the switch.
    time.sleep(WARMUP_S)
    before = cpu_sample(running.groups)
    time.sleep(seconds)
    after = cpu_sample(running.groups)
    out, _ = client.communicate()
    if client.returncode != 0:
        raise RuntimeError(f"the load generator failed with code {client.returncode}")
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    requests = max(result["rps"] * seconds, 1.0)
    for key, value in cpu_delta(before, after).items():
        result[f"cpu:{key}"] = value / requests * 1e6  # µs per request
    result["quiet"] = float(quiet)
    result["busy"] = busy
    return result


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (a CPU key missing from a round counts as 0)."""
    keys = {k for s in samples for k in s}
    out = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}
    out["quiet"] = min(s["quiet"] for s in samples)  # 0 when any round started on a busy machine
    out["busy"] = max(s["busy"] for s in samples)
    out["errors"] = sum(s["errors"] for s in samples)  # every error counts, not the median
    return out


def cpu_parts(result: dict[str, float]) -> list[tuple[str, float]]:
    """Per process, largest first: every named process, and of a tree's members those over 5% of
    the total (the rest as "other")."""
    parts = sorted(((k[4:], v) for k, v in result.items() if k.startswith("cpu:")), key=lambda kv: -kv[1])
    total = sum(v for _, v in parts)
    shown = [(k, v) for k, v in parts if v >= 0.5 and ("/" not in k or v >= 0.05 * total)]
    rest = total - sum(v for _, v in shown)
    return shown + ([("other", rest)] if rest >= 0.5 else [])


def cpu_total(result: dict[str, float]) -> float:
    return sum(v for k, v in result.items() if k.startswith("cpu:"))


# -- reporting ----------------------------------------------------------------------------------
def table(results: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    lines = [
        "| system | body | c=1 req/s | c=64 req/s | c=64 p99 ms | server CPU µs/req at c=64, per process "
        "| c=1 CPU µs/req | errors |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, by_c in results.items():
        one, many = by_c[1], by_c[64]
        parts = " + ".join(f"{k} {v:,.0f}" for k, v in cpu_parts(many))
        noisy = "" if one["quiet"] and many["quiet"] else " †"
        lines.append(
            f"| {ROWS[name].label}{noisy} | {ROWS[name].body} | {one['rps']:,.0f} | {many['rps']:,.0f} "
            f"| {many['p99_ms']:.1f} | {parts} = **{cpu_total(many):,.0f}** | {cpu_total(one):,.0f} "
            f"| {one['errors'] + many['errors']:.0f} |"
        )
    return lines


def goals(results: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """The README's claims, each as measured / goal, or why it could not be checked."""

    def rps(row: str, c: int) -> float | None:
        return results[row][c]["rps"] if row in results else None

    def ratio(label: str, a: float | None, b: float | None, goal: float, at_most: bool = False) -> str:
        if a is None or b is None or b == 0:
            return f"- {label}: not measured (a row was skipped)"
        value = a / b
        ok = value <= goal if at_most else value >= goal
        return f"- {label}: {value:.2f} (goal {'≤' if at_most else '≥'} {goal:g}) {'met' if ok else 'NOT met'}"

    def router(row: str) -> float | None:
        return results[row][64].get("cpu:router") if row in results else None

    ceiling = cpu_total(results["ceiling"][64]) if "ceiling" in results else None
    lines = [
        ratio("c=64 aimesh JSON / FastAPI", rps("aimesh-json", 64), rps("fastapi", 64), 2),
        ratio("c=64 aimesh JSON / prototype", rps("aimesh-json", 64), rps("prototype", 64), 1.2),
        ratio("c=64 aimesh binary / FastAPI", rps("aimesh-binary", 64), rps("fastapi", 64), 2.5),
        ratio("c=64 router CPU per request / the ceiling's (binary)", router("aimesh-binary"), ceiling, 2.5, True),
        ratio("c=64 router CPU per request / the ceiling's (JSON)", router("aimesh-json"), ceiling, 2.5, True),
        ratio("c=1 aimesh binary / prototype", rps("aimesh-binary", 1), rps("prototype", 1), 1),
        ratio("c=1 aimesh JSON / prototype", rps("aimesh-json", 1), rps("prototype", 1), 1),
    ]
    for row in ("aimesh-json", "aimesh-binary"):
        if row in results:
            total = cpu_total(results[row][1])
            met = "met" if total <= 2500 else "NOT met"
            lines.append(f"- c=1 {row} server CPU per request: {total:,.0f} µs (goal ≤ 2,500) {met}")
    errors = sum(r["errors"] for by_c in results.values() for r in by_c.values())
    lines.append(f"- errors, all rows and rounds: {errors:.0f} (goal 0) {'met' if errors == 0 else 'NOT met'}")
    return lines


def write_doc(out: Path, header: list[str], body: list[str], chart: Path | None) -> None:
    caption = "requests per second by system, at concurrency 1 and 64"
    replace_section(out, (MARK_BEGIN, MARK_END), header, body, chart, caption, "# Performance\n")


def replace_section(
    out: Path, marks: tuple[str, str], header: list[str], body: list[str], chart: Path | None, caption: str, new: str
) -> None:
    """The section between the ``marks`` in ``out`` replaced (appended when there are none; a
    missing file starts as ``new``): each header line a paragraph, then ``body``, then the chart."""
    begin, end = marks
    section = [begin, "\n\n".join(header), "", *body]
    if chart is not None:
        section += ["", f"![{caption}]({chart.name})"]
    section.append(end)
    text = out.read_text() if out.exists() else new
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + "\n".join(section) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    out.write_text(text)


def draw_chart(data: dict[str, Any], png: str) -> None:
    """Throughput bars at c=1 and c=64 (run by whichever interpreter has matplotlib)."""
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    labels = list(data)[::-1]
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(labels) + 1.4))
    ax.barh(y + 0.2, [data[k]["64"] for k in labels], height=0.4, label="c=64")
    ax.barh(y - 0.2, [data[k]["1"] for k in labels], height=0.4, label="c=1")
    ax.set_yticks(y, labels)
    ax.set_xlabel("requests per second (median of rounds)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def chart(results: dict[str, dict[int, dict[str, float]]], png: Path, python: str) -> bool:
    data = {ROWS[n].label: {str(c): r["rps"] for c, r in by_c.items()} for n, by_c in results.items()}
    try:
        draw_chart(data, str(png))
        return True
    except ImportError:
        pass
    done = subprocess.run(
        [python, __file__, "--role", "chart", "--data", json.dumps(data), "--png", str(png)], check=False
    )
    return done.returncode == 0


# -- the peers' servers (run by the peers' interpreter) -----------------------------------------
def fastapi_server(port: int) -> None:
    import torch
    import uvicorn  # type: ignore[import-not-found]
    from fastapi import FastAPI, Request, Response  # type: ignore[import-not-found]

    model = serve._model()

    async def infer(request: Request) -> Response:
        raw = await request.body()
        x = parse_binary(raw, int(request.headers[HEADER_LENGTH])).copy()
        with torch.inference_mode():
            logits = model(torch.from_numpy(x)).numpy()
        body, length = encode_binary(logits)
        return Response(content=body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    # FastAPI reads the handler's annotations to inject the request; under this module's
    # postponed annotations they are strings naming imports local to this function.
    infer.__annotations__ = {"request": Request, "return": Response}
    app = FastAPI()
    app.add_api_route(PATH, infer, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def ray_server(port: int) -> None:
    import ray  # type: ignore[import-not-found]
    import torch
    from ray import serve as rayserve
    from starlette.requests import Request  # type: ignore[import-not-found]
    from starlette.responses import Response  # type: ignore[import-not-found]

    class Model:
        def __init__(self) -> None:
            self.model = serve._model()

        async def forward(self, rows: Any) -> Any:  # called with one array, run with a list of them
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(np.concatenate(rows))).numpy()
            return np.split(logits, np.cumsum([len(r) for r in rows])[:-1])

        # As @serve.batch (a decorator from an untyped package would make mypy's strict mode
        # complain); Ray finds ``self`` by the method's name, so the name stays ``forward``.
        forward = rayserve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=PEER_WAIT_S)(forward)

        async def __call__(self, request: Request) -> Response:
            raw = await request.body()
            logits = await self.forward(parse_binary(raw, int(request.headers[HEADER_LENGTH])).copy())
            body, length = encode_binary(logits)
            return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally below shuts Ray down
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rayserve.start(http_options={"host": "127.0.0.1", "port": port})
        # Ray Serve's default of 5 ongoing requests per replica would cap its batches at 5.
        app = rayserve.deployment(num_replicas=1, max_ongoing_requests=4 * MAX_BATCH)(Model).bind()
        rayserve.run(app, route_prefix=PATH)
        while True:
            time.sleep(3600)
    finally:
        rayserve.shutdown()
        ray.shutdown()


# -- main ---------------------------------------------------------------------------------------
def peer_versions(python: str) -> dict[str, str | None]:
    """Which peer packages ``python`` has: their versions, None for a missing one."""
    probe = (
        "import json, importlib.metadata as m, importlib.util as u\n"
        "out = {}\n"
        "for mod, dist in [('fastapi','fastapi'), ('uvicorn','uvicorn'), ('starlette','starlette'), "
        "('litserve','litserve'), ('ray','ray'), ('torch','torch'), ('matplotlib','matplotlib')]:\n"
        "    out[mod] = m.version(dist) if u.find_spec(mod) else None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {}
    found: dict[str, str | None] = json.loads(done.stdout)
    return found


def missing(row: Row, versions: dict[str, str | None]) -> list[str]:
    return [m for m in row.modules if not versions.get(m.split(".")[0])]


def bench_env() -> dict[str, str]:
    """bench/serve.py's environment, and what the peers' own processes need."""
    env = serve.bench_env()
    env.update(
        PYTHONPATH=str(ROOT),  # Ray's workers and LitServe's spawned worker import bench.*
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",  # local only: no token file written under ~/.ray
    )
    return env


def runnable(args: argparse.Namespace, versions: dict[str, str | None]) -> list[str]:
    """The rows asked for whose peers are installed; each one left out says why."""
    rows: list[str] = []
    for name in (n for n in ROWS if not args.only or n in args.only):
        lacking = missing(ROWS[name], versions)
        if lacking:
            print(f"  skipped {name}: {args.peers_python} lacks {', '.join(lacking)} (install: {INSTALL_HINT})")
        else:
            rows.append(name)
    return rows


def run(args: argparse.Namespace) -> None:
    versions = peer_versions(args.peers_python)
    rows = runnable(args, versions)
    if not rows:
        print("  nothing to run")
        return
    env = bench_env()
    print(
        f"peers benchmark: MLP 256→{'→'.join(map(str, serve.HIDDEN))}→10, {args.seconds:g} s per run, "
        f"{args.rounds} round(s), rows: {', '.join(rows)}; {os.cpu_count()} cores",
        flush=True,
    )
    from shared.natsserver import NatsServer

    systems: dict[str, Running] = {}
    mesh: Mesh | None = None
    with NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="aimesh-bench-peers-")), http_port=None) as server:
        assert server.process is not None
        env["AIMESH_NATS_URL"] = server.url
        try:
            for name in rows:
                print(f"  starting {name}", flush=True)
                try:
                    if name == "prototype":
                        systems[name] = start_prototype(server.url, env, server.process.pid)
                    elif name.startswith("aimesh"):
                        mesh = mesh or Mesh(server.url, env)
                        workers = 2 if name == "aimesh-2workers" else 1
                        systems[name] = mesh.row(workers, server.process.pid, coalesce=not name.endswith("-single"))
                    else:
                        systems[name] = start_peer(ROWS[name], args.peers_python, env)
                except RuntimeError as exc:  # a peer that cannot start is left out, and says why
                    print(f"  skipped {name}: it did not start: {exc}", flush=True)
            rows = [n for n in rows if n in systems]
            samples = run_rounds(args, rows, systems)
        finally:
            for running in systems.values():
                stop(running)
            if mesh is not None:
                mesh.close()
    if not rows:
        print("  no row started")
        return
    report(args, {n: {c: summarize(s) for c, s in samples[n].items()} for n in rows}, versions)


def run_rounds(
    args: argparse.Namespace, rows: list[str], systems: dict[str, Running]
) -> dict[str, dict[int, list[dict[str, float]]]]:
    """Every row at every concurrency, ``args.rounds`` times, the order rotated by one a round."""
    samples: dict[str, dict[int, list[dict[str, float]]]] = {n: {c: [] for c in CONCURRENCIES} for n in rows}
    for r in range(args.rounds if rows else 0):
        for name in rows[r % len(rows) :] + rows[: r % len(rows)]:
            running = systems[name]
            running.enter()
            try:
                for c in CONCURRENCIES:
                    sample = measure(running, ROWS[name].body, c, args.seconds, args.quiet_wait)
                    samples[name][c].append(sample)
                    print(
                        f"  round {r + 1} {name:<16} c={c:<3} {sample['rps']:>8,.0f} req/s "
                        f"p99 {sample['p99_ms']:>7.1f} ms  CPU {cpu_total(sample):>7,.0f} µs/req  "
                        f"errors {sample['errors']:.0f}{'' if sample['quiet'] else '  (machine busy)'}",
                        flush=True,
                    )
            finally:
                running.leave()
    return samples


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU unknown"


def report(args: argparse.Namespace, results: dict[str, dict[int, dict[str, float]]], versions: dict[str, Any]) -> None:
    busy_runs = [r for by_c in results.values() for r in by_c.values() if not r["quiet"]]
    have = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "none"
    header = [
        f"Measured with `bench/peers.py --seconds {args.seconds:g} --rounds {args.rounds}` on {os.cpu_count()} cores "
        f"({_cpu_model()}), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; peers' interpreter has: {have}.  Medians over "
        f"{args.rounds} rotated round(s); CPU is µs of server CPU per request over the measured window.",
    ]
    if busy_runs:
        header.append(
            f"† some of the row's runs started on a busy machine (no quiet within {args.quiet_wait:g} s; "
            f"up to {max(r['busy'] for r in busy_runs):.0%} of all cores busy): its figures are noisy."
        )
    lines = table(results)
    checks = goals(results)
    print("\n" + "\n".join([*header, "", *lines, "", "Goals:", *checks]))
    if args.no_write:
        return
    out = Path(args.out)
    png = out.parent / CHART
    drawn = chart(results, png, args.peers_python)
    if not drawn:
        print(f"  no chart: neither this interpreter nor {args.peers_python} has matplotlib ({INSTALL_HINT})")
    write_doc(out, header, [*lines, "", "Goals:", "", *checks], png if drawn else None)
    print(f"\n  wrote {out}" + (f" and {png}" if drawn else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="bench", choices=["bench", "client", "fastapi", "litserve", "ray", "chart"])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every row, rotated; medians shown")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), metavar="ROW", help=f"rows: {', '.join(ROWS)}")
    parser.add_argument("--peers-python", default=sys.executable, help="the interpreter that runs the peers")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="at most this long for a quiet machine")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    # roles' arguments
    parser.add_argument("--url")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--body", choices=["binary", "json"], default="binary")
    parser.add_argument("--data")
    parser.add_argument("--png")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.role == "client":
        import uvloop

        if args.body == "json":
            # The whole body is the JSON header: the length header then says what plain JSON
            # means (the router parses it the same way), and LitServe ignores it.
            serve.HEADER = serve.BODY = JSON_BODY
        print("go", flush=True)
        print(json.dumps(uvloop.run(serve.client(args.url, args.concurrency, args.seconds))))
    elif args.role == "fastapi":
        fastapi_server(args.port)
    elif args.role == "litserve":
        from bench import peer_litserve

        peer_litserve.run(args.port, MAX_BATCH, PEER_WAIT_S)
    elif args.role == "ray":
        ray_server(args.port)
    elif args.role == "chart":
        draw_chart(json.loads(args.data), args.png)
    else:
        run(args)


if __name__ == "__main__":
    main()
