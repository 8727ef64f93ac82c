"""What a worker's death or stall costs synchronous requests, with hedging on and off.

    .venv/bin/python bench/failover.py [--seconds 6] [--concurrency 8]

For each of ``hedge_budget`` 0.5 (the default) and 0 (off), and each event, a fresh mesh (one
router, two inference workers, ``bench/serve.py``'s MLP and environment) takes a steady closed
loop of ``--concurrency`` clients sending one-row OIP requests with a 10 s deadline:

- ``kill``: one worker is SIGKILLed in the middle of the run;
- ``stop``: one worker is SIGSTOPped in the middle and SIGCONTed ``--stop-seconds`` later.

Printed per run: requests, failures (by status), p99 before the event and during the event
window (the event until the end of the run, or until SIGCONT), and their ratio.  The goal
(issue 17): no failed request and p99 during the event within 3× the steady p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import serve  # noqa: E402

BODY = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.25] * 256}]}


async def load(url: str, concurrency: int, seconds: float) -> list[tuple[float, float, int]]:
    """(start, latency s, status) of every request of a closed loop; status 0: no answer."""
    import aiohttp

    results: list[tuple[float, float, int]] = []
    stop_at = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                async with http.post(url, json=BODY, headers={"Aimesh-Timeout-Ms": "10000"}) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            results.append((t0, time.monotonic() - t0, status))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    return results


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def run_once(event: str, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    from shared.natsserver import NatsServer

    env = serve.bench_env() | {"AIMESH_ROUTER_HEDGE_BUDGET": budget}
    with NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="aimesh-failover-")), http_port=None) as server:
        env["AIMESH_NATS_URL"] = server.url
        procs = [serve.start_service(s, env) for s in ("router", "inference", "inference")]
        loop = asyncio.new_event_loop()
        try:
            nc, names = loop.run_until_complete(serve.mesh_setup(server.url))
            url = loop.run_until_complete(serve.deploy(nc, names, max_batch=32, workers=2))
            loop.run_until_complete(load(url, args.concurrency, 2.0))  # warm: the router learns latencies
            victim = procs[1]
            t_event = time.monotonic() + args.seconds / 2
            t_end_event = t_event + (args.stop_seconds if event == "stop" else args.seconds)

            def strike() -> None:
                time.sleep(max(0.0, t_event - time.monotonic()))
                os.kill(victim.pid, signal.SIGKILL if event == "kill" else signal.SIGSTOP)
                if event == "stop":
                    time.sleep(args.stop_seconds)
                    os.kill(victim.pid, signal.SIGCONT)

            striker = loop.run_in_executor(None, strike)
            results = loop.run_until_complete(load(url, args.concurrency, args.seconds + 1.0))
            loop.run_until_complete(striker)
            loop.run_until_complete(nc.close())
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            loop.close()
    before = [lat for t, lat, _ in results if t < t_event]
    during = [lat for t, lat, _ in results if t_event <= t < t_end_event]
    failed: dict[int, int] = {}
    for _, _, status in results:
        if status != 200:
            failed[status] = failed.get(status, 0) + 1
    steady, event_p99 = p99(before), p99(during)
    return {
        "requests": len(results),
        "failed": failed,
        "p99_steady_ms": steady * 1000,
        "p99_event_ms": event_p99 * 1000,
        "ratio": event_p99 / steady if steady else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured load per run")
    parser.add_argument("--stop-seconds", type=float, default=2.0, help="how long the stopped worker stays stopped")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--events", nargs="+", default=["kill", "stop"], choices=["kill", "stop"])
    args = parser.parse_args()
    print(f"failover: 1 router, 2 workers, c={args.concurrency}, {args.seconds:g} s per run; {os.cpu_count()} cores")
    print("| event | hedging | requests | failed | p99 steady ms | p99 during the event ms | ratio (goal ≤ 3) |")
    print("|---|---|---:|---|---:|---:|---:|")
    for event in args.events:
        for budget in ("0.5", "0"):
            r = run_once(event, budget, args)
            failed = ", ".join(f"{n} × {s or 'no answer'}" for s, n in sorted(r["failed"].items())) or "0"
            print(
                f"| {event} | {'on (0.5)' if budget != '0' else 'off'} | {r['requests']:,} | {failed} | "
                f"{r['p99_steady_ms']:.1f} | {r['p99_event_ms']:.1f} | {r['ratio']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
