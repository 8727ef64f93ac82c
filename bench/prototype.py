"""The minimal honest serving path, in one file: aiohttp gateway → NATS → greedy-batching worker.

    .venv/bin/python bench/prototype.py worker --nats nats://127.0.0.1:4222
    .venv/bin/python bench/prototype.py gateway --nats nats://127.0.0.1:4222 --port 8080

The gateway parses the Open Inference Protocol binary body (a JSON header of
``Inference-Header-Content-Length`` bytes, then the FP32 row), sends the row's bytes as one NATS
request, and answers with binary ``logits`` and ``class`` outputs.  The worker takes every request
already waiting, up to 32, into one forward pass of ``bench/serve.py``'s model and replies to each:
no waiting for a batch to fill, no validation, no tracing, no metrics.  It is the reference that
aimesh's own serving path (which does all of those) is measured against in ``bench/peers.py``.
The OIP helpers here are also what the peers' servers there use, so every server does the same
decoding work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HEADER_LENGTH = "Inference-Header-Content-Length"
SUBJECT = "prototype.mlp"
MAX_BATCH = 32
CLASSES = 10


def parse_binary(raw: bytes, header_length: int) -> np.ndarray:
    """The one FP32 input of an OIP binary body, as a (rows, features) array (no copy)."""
    header = json.loads(raw[:header_length])
    shape = header["inputs"][0]["shape"]
    return np.frombuffer(raw, dtype="<f4", offset=header_length).reshape(shape)


def encode_binary(logits: np.ndarray) -> tuple[bytes, int]:
    """An OIP binary response with ``logits`` and ``class`` outputs, and its JSON header's length."""
    logits = np.ascontiguousarray(logits, dtype="<f4")
    classes = logits.argmax(-1).astype("<i8")
    header = json.dumps(
        {
            "model_name": "mlp",
            "outputs": [
                {
                    "name": "logits",
                    "shape": list(logits.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": logits.nbytes},
                },
                {
                    "name": "class",
                    "shape": list(classes.shape),
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": classes.nbytes},
                },
            ],
        }
    ).encode()
    return header + logits.tobytes() + classes.tobytes(), len(header)


async def gateway(nats_url: str, port: int) -> None:
    import nats
    from aiohttp import web

    nc = await nats.connect(nats_url)

    async def infer(request: web.Request) -> web.Response:
        raw = await request.read()
        row = parse_binary(raw, int(request.headers[HEADER_LENGTH]))
        reply = await nc.request(SUBJECT, row.tobytes(), timeout=10)
        logits = np.frombuffer(reply.data, dtype="<f4").reshape(row.shape[0], CLASSES)
        body, length = encode_binary(logits)
        return web.Response(body=body, content_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    app = web.Application()
    app.router.add_post("/v2/models/mlp/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def worker(nats_url: str) -> None:
    import nats
    import torch

    from bench.serve import _model

    model = _model()
    nc = await nats.connect(nats_url)
    pending: deque[Any] = deque()
    arrived = asyncio.Event()

    async def take(msg: Any) -> None:
        pending.append(msg)
        arrived.set()

    await nc.subscribe(SUBJECT, queue="workers", cb=take)
    await nc.flush()
    print("ready", flush=True)
    while True:
        await arrived.wait()
        # Greedy: whatever is waiting now (up to 32) is the batch; the forward pass blocks the
        # loop, so the requests that arrive meanwhile make the next batch.
        batch = [pending.popleft() for _ in range(min(MAX_BATCH, len(pending)))]
        if not pending:
            arrived.clear()
        rows = [np.frombuffer(m.data, dtype="<f4").reshape(-1, 256) for m in batch]
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.concatenate(rows))).numpy()
        start = 0
        for msg, x in zip(batch, rows, strict=True):
            await msg.respond(logits[start : start + len(x)].tobytes())
            start += len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["gateway", "worker"])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    import uvloop

    uvloop.run(gateway(args.nats, args.port) if args.role == "gateway" else worker(args.nats))


if __name__ == "__main__":
    main()
