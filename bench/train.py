"""Training throughput: aimesh DP (data streamed from JetStream, ranks started by trainer agents)
against plain torchrun DDP of the same model on the same data held in memory, same run.

    .venv/bin/python bench/train.py [--epochs 10] [--hidden 512 512]

Rows: 1 and 2 ranks each way; figures are global samples/s inside the training loop (start-up,
rendezvous and data loading excluded on both sides); goal: aimesh within 10% of torchrun.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from aimesh.demo import wait_for_service  # noqa: E402
from aimesh.jobs import ingest, train  # noqa: E402
from shared.names import Names  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from shared.schemas import IngestRequest, TrainRequest  # noqa: E402


async def aimesh_runs(url: str, names: Names, epochs: int, hidden: list[int]) -> dict[int, float]:
    nc = await nats.connect(url)
    await wait_for_service(nc, names, "ingest")
    await ingest(nc, names, IngestRequest(paths=["demo:digits"], dataset="digits", shards=4), progress=False)
    await wait_for_service(nc, names, "trainer", count=2)
    out = {}
    for world in (1, 2):
        req = TrainRequest(
            model="bench",
            factory="zoo.classifier:mlp",
            dataset="digits",
            nodes=world,
            epochs=epochs,
            kwargs={"inputs": 64, "classes": 10, "hidden": hidden},
            batch_size=64,
            lr=1e-3,
        )
        job = await train(nc, names, req, show=False)
        if job.state != "complete":
            raise SystemExit(f"aimesh training failed: {job.error}")
        out[world] = job.metrics["train_samples_per_s"]
    await nc.close()
    return out


def torchrun(world: int, epochs: int, hidden: list[int]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc-per-node={world}",
        "--master-port=29561",
        str(ROOT / "bench" / "ddp_baseline.py"),
        str(epochs),
        "64",
        *map(str, hidden),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"samples_per_s ([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="*", default=[512, 512])
    args = parser.parse_args()
    print(
        f"training benchmark: digits MLP 64→{'→'.join(map(str, args.hidden))}→10, global batch 64, "
        f"{args.epochs} epochs, gloo, 1 torch thread per rank; {os.cpu_count()} cores"
    )
    store = Path(tempfile.mkdtemp(prefix="aimesh-bench-train-"))
    with NatsServer(store_dir=store, http_port=None) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
        env.update(AIMESH_NATS_URL=server.url, AIMESH_PREFIX="benchtrain", OTEL_SDK_DISABLED="true")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", f"services.{s}"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for s in ("ingest", "trainer", "trainer")
        ]
        try:
            ours = asyncio.run(aimesh_runs(server.url, Names("benchtrain"), args.epochs, args.hidden))
            # The baseline runs while the (idle) mesh is still up, so both see the same machine.
            theirs = {world: torchrun(world, args.epochs, args.hidden) for world in (1, 2)}
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    alone = {world: torchrun(world, args.epochs, args.hidden) for world in (1, 2)}
    print(f"\n  {'ranks':>5}  {'aimesh':>10}  {'torchrun':>10}  {'ratio':>6}  {'torchrun, mesh stopped':>23}")
    for world in (1, 2):
        print(
            f"  {world:>5}  {ours[world]:>10,.0f}  {theirs[world]:>10,.0f}  {ours[world] / theirs[world]:>6.2f}  "
            f"{alone[world]:>23,.0f}"
        )
    print("  (global samples/s inside the training loop)")


if __name__ == "__main__":
    main()
