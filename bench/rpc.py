"""Request/reply throughput: an aimesh actor against raw nats-py, same server, same run.

    .venv/bin/python bench/rpc.py [--seconds 3] [--rounds 3]

One responder process and one requester process per row, on a fresh embedded nats-server:

- ``raw``: a bare nats-py subscriber that echoes the bytes (the ceiling);
- ``actor, tracing off``: an aimesh service whose actor decodes, calls the handler and encodes
  the reply (msgspec), with ``OTEL_SDK_DISABLED=true``;
- ``actor, tracing default``: the same with tracing at its default setting (SDK on, no exporter
  configured): the parent-based sampler records 1% of root traces (``trace_sample_ratio`` 0.01)
  and every trace whose caller marked it sampled.  The raw requester sends no ``traceparent``, so
  every message is a root and about 1% of them get a recorded CONSUMER span; the rest take the
  unsampled fast path;
- ``actor, tracing every message``: every message recorded as a span (sample ratio 1, no
  exporter): the cost of the SDK's span objects themselves;
- ``actor + aimesh client, tracing off``: the tracing-off responder called through
  ``shared.client.request`` with tracing off on both sides: what the typed client path (deadline
  header, typed errors, msgspec) costs over ``nc.request``;
- ``actor + aimesh client``: the default-tracing responder, called through ``shared.client.request``
  (CLIENT span, traceparent and deadline headers, typed errors) instead of raw ``nc.request``.
  The requester's tracer records every root (``setup_tracing``'s ratio of 1), so each
  ``traceparent`` says sampled and the responder, following its caller, records every message
  too: this row prices a fully traced hop on both sides, not the 1% default.

Each figure is the median of ``--rounds`` runs of ``--seconds`` each, after a warm-up; rows for
one concurrency run back to back, so ratios compare like with like.

``--secure`` measures what identities and TLS cost instead: the raw and the default actor rows
against an open server and against a server that admits only two nkeys (responder, requester,
each with its own permissions) over TLS with a local CA, interleaved in one run.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from shared.actor import ActorConfig, Call  # noqa: E402
from shared.schemas import Message  # noqa: E402
from shared.service import Service  # noqa: E402

SUBJECT = "bench.rpc.echo"


class Ping(Message, frozen=True, kw_only=True):
    seq: int
    payload: bytes


class BenchService(Service):
    name = "bench"

    async def setup(self) -> None:
        config = ActorConfig(name="echo", subject=SUBJECT, queue_group="", max_concurrency=64, mailbox_size=1024)
        self.add_actor(config, self.echo, Ping)

    async def echo(self, req: Ping, _: Call) -> Ping:
        return req


# -- roles (each runs in its own process) ---------------------------------------------------------
def _connect_options(url: str) -> dict[str, Any]:
    """The mesh's own connection options: the nkey seed and CA from the environment, if any."""
    from shared.config import load_mesh_config
    from shared.connect import connect_options

    return connect_options(load_mesh_config(overrides={"nats_url": url, "prefix": "bench"}), "bench")


async def _raw_responder(url: str) -> None:
    import nats

    nc = await nats.connect(**_connect_options(url))

    async def cb(msg: Any) -> None:
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe(SUBJECT, cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _actor_responder(url: str) -> None:
    from shared.config import load_mesh_config

    svc = BenchService(load_mesh_config(overrides={"nats_url": url, "prefix": "bench"}))
    await svc.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _requester(url: str, concurrency: int, seconds: float, client: str) -> dict[str, float]:
    import nats

    from shared.client import request
    from shared.tracing import setup_tracing

    if client == "aimesh":
        setup_tracing("bench-client", "requester", "0", "bench")
    nc = await nats.connect(**_connect_options(url))
    body = msgspec.msgpack.encode(Ping(seq=0, payload=b"x" * 64))
    ping = Ping(seq=0, payload=b"x" * 64)
    latencies: list[float] = []
    count = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal count
        while (t0 := time.perf_counter()) < stop_at:
            if client == "aimesh":
                await request(nc, SUBJECT, ping, Ping, timeout_s=5)
            else:
                await nc.request(SUBJECT, body, timeout=5)
            latencies.append(time.perf_counter() - t0)
            count += 1

    stop_at = time.perf_counter() + 0.5  # warm-up
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    count, latencies = 0, []
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await nc.close()
    latencies.sort()
    return {
        "rps": count / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


# -- orchestration ----------------------------------------------------------------------------------
MODES = [
    # label, responder role, tracing setting, requester client
    ("raw nats-py", "raw", "off", "raw"),
    ("actor, tracing off", "actor", "off", "raw"),
    ("actor, tracing default", "actor", "default", "raw"),
    ("actor, tracing every message", "actor", "all", "raw"),
    ("actor + aimesh client, tracing off", "actor", "off", "aimesh"),
    ("actor + aimesh client, tracing default", "actor", "default", "aimesh"),
]


SECURE_MODES = [MODES[0], MODES[2]]


def _env(tracing: str, secure: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AIMESH_"))}
    env |= secure or {}
    if tracing == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif tracing == "all":
        env["AIMESH_TRACE_SAMPLE_RATIO"] = "1"
    return env


def _run_mode(
    url: str,
    mode: tuple[str, str, str, str],
    concurrency: int,
    seconds: float,
    secure: dict[str, dict[str, str]] | None = None,
) -> dict[str, float]:
    _, role, tracing, client = mode
    secure = secure or {}
    responder = subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--url", url],
        env=_env(tracing, secure.get("responder")),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert responder.stdout is not None
        assert responder.stdout.readline().strip() == "ready"
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--role",
                "requester",
                "--url",
                url,
                "--concurrency",
                str(concurrency),
                "--seconds",
                str(seconds),
                "--client",
                client,
            ],
            env=_env(tracing, secure.get("requester")),
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        responder.kill()
        responder.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["bench", "raw", "actor", "requester"], default="bench")
    parser.add_argument("--url")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", default="raw")
    parser.add_argument("--secure", action="store_true", help="identities and TLS against an open server")
    args = parser.parse_args()

    if args.role != "bench":
        import uvloop

        if args.role == "raw":
            uvloop.run(_raw_responder(args.url))
        elif args.role == "actor":
            uvloop.run(_actor_responder(args.url))
        else:
            result = uvloop.run(_requester(args.url, args.concurrency[0], args.seconds, args.client))
            print(json.dumps(result))
        return

    from shared.natsserver import NatsServer

    if args.secure:
        _secure_bench(args)
        return
    print(f"rpc benchmark: {args.rounds} rounds × {args.seconds:g}s per row, median shown; {os.cpu_count()} cores")
    with NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="aimesh-bench-")), http_port=None) as server:
        for concurrency in args.concurrency:
            rows: dict[str, list[dict[str, float]]] = {m[0]: [] for m in MODES}
            for _ in range(args.rounds):
                for mode in MODES:  # interleaved, so drift hits every row alike
                    rows[mode[0]].append(_run_mode(server.url, mode, concurrency, args.seconds))
            base = statistics.median(r["rps"] for r in rows[MODES[0][0]])
            print(f"\nconcurrency {concurrency}")
            print(f"  {'responder / requester':<42} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}")
            for label, results in rows.items():
                rps = statistics.median(r["rps"] for r in results)
                p50 = statistics.median(r["p50_ms"] for r in results)
                p99 = statistics.median(r["p99_ms"] for r in results)
                print(f"  {label:<42} {rps:>9,.0f} {p50:>8.3f} {p99:>8.3f} {rps / base:>7.2f}")


def _secure_bench(args: argparse.Namespace) -> None:
    """Open against identities + TLS, the same rows interleaved in one run."""
    from shared import auth
    from shared.natsserver import NatsServer
    from shared.tls import ensure_local_pki

    work = Path(tempfile.mkdtemp(prefix="aimesh-bench-"))
    pki = ensure_local_pki(work / "tls")
    seeds = {who: work / f"{who}.nk" for who in ("responder", "requester")}
    for path in seeds.values():
        auth.write_private(path, auth.new_seed())
    key = {who: auth.public_key(auth.read_seed(path)) for who, path in seeds.items()}
    # The responder is a mesh service (discovery, status, snapshots); the requester only asks.
    users = [
        {
            "nkey": key["responder"],
            "permissions": {
                "publish": {"allow": ["bench.>"]},
                "subscribe": {"allow": [SUBJECT, "bench.>", "$SRV.>", "_INBOX.>"]},
                "allow_responses": True,
            },
        },
        {
            "nkey": key["requester"],
            "permissions": {"publish": {"allow": [SUBJECT]}, "subscribe": {"allow": ["_INBOX.>"]}},
        },
    ]
    authz = f"authorization: {json.dumps({'users': users})}\n"
    tls = {"cert_file": str(pki.cert), "key_file": str(pki.key)}
    (work / "nkeys.conf").write_text(authz)
    (work / "nkeys-tls.conf").write_text(authz + f"tls: {json.dumps(tls)}\n")
    nkeys_env = {who: {"AIMESH_NATS_NKEY": str(path)} for who, path in seeds.items()}
    tls_env = {who: env | {"AIMESH_NATS_TLS_CA": str(pki.ca)} for who, env in nkeys_env.items()}
    print(f"rpc benchmark, open vs nkeys vs nkeys + TLS: {args.rounds} rounds × {args.seconds:g}s per row, median")
    with (
        NatsServer(store_dir=work / "open", http_port=None) as open_server,
        NatsServer(store_dir=work / "nk", http_port=None, extra_args=["-c", str(work / "nkeys.conf")]) as nk_server,
        NatsServer(
            store_dir=work / "tls", http_port=None, extra_args=["-c", str(work / "nkeys-tls.conf")]
        ) as tls_server,
    ):
        servers = (
            ("open", open_server.url, None),
            ("nkeys", nk_server.url, nkeys_env),
            ("nkeys + TLS", tls_server.url, tls_env),
        )
        for concurrency in args.concurrency:
            rows: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for mode in SECURE_MODES:
                    for label, url, secure in servers:
                        rows.setdefault(f"{mode[0]}, {label}", []).append(
                            _run_mode(url, mode, concurrency, args.seconds, secure)
                        )
            print(f"\nconcurrency {concurrency}")
            print(f"  {'responder / server':<42} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs open':>8}")
            for label, results in rows.items():
                rps = statistics.median(r["rps"] for r in results)
                open_rps = statistics.median(r["rps"] for r in rows[label.rsplit(", ", 1)[0] + ", open"])
                p50 = statistics.median(r["p50_ms"] for r in results)
                p99 = statistics.median(r["p99_ms"] for r in results)
                print(f"  {label:<42} {rps:>9,.0f} {p50:>8.3f} {p99:>8.3f} {rps / open_rps:>8.2f}")


if __name__ == "__main__":
    main()
