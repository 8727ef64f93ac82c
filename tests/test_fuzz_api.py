"""Property-based fuzzing of the live gateway from its own OpenAPI document (schemathesis).

A real router process and a real inference worker (on a real nats-server) serve a deployed
classifier (``digits``) and a language model (``lm``); schemathesis loads ``/openapi.json`` from
the router, generates requests for every operation (valid and invalid data, fixed seed, bounded
examples) and runs every check it has on each response.  Zero failures means: no 5xx, no status
the document does not list, no body or content type that does not conform to it.  The counts
of statuses are printed (``-s``); ``AIMESH_FUZZ_BASE=http://host:port`` fuzzes a router that is
already running instead (e.g. an older commit's, for a before/after figure), and
``AIMESH_FUZZ_HAR=path`` keeps every request and response (HAR) there.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from shared.client import request
from shared.names import Names
from shared.schemas import Deployment, DeployRequest
from tests.helpers import ServiceProcess, eventually
from tests.mesh import register_lm, register_mlp, serving, start_gateway

pytestmark = pytest.mark.slow

SEED = 20261203
MAX_EXAMPLES = 12  # per operation and phase: about 1,500 requests, under a minute on 2 cores
# Every check schemathesis has, less positive_data_acceptance: it wants a 2xx for any input the
# document allows, and JSON Schema cannot say that an input's data must fit its shape or that a
# name must be deployed (those 400 / 404 are documented instead).
EXCLUDED = ["positive_data_acceptance"]
# A 504 is the documented answer when the caller's own Aimesh-Timeout-Ms passes: schemathesis lets
# it through, and :func:`server_errors` counts it unless the caller asked for a tiny deadline.
CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "504"]
"""
TINY_DEADLINE_MS = 100.0


def schemathesis_args(base: str, har: Path, config: Path) -> list[str]:
    return [
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED),
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--workers",
        "1",  # hypothesis describes strategies with ast.parse, which is not thread-safe in 3.11
        "--request-timeout",
        "15",
        "--no-color",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--continue-on-failure",
    ]


def status_counts(entries: list[dict[str, Any]]) -> dict[int, int]:
    return dict(sorted(collections.Counter(int(e["response"]["status"]) for e in entries).items()))


def asked_deadline_ms(entry: dict[str, Any]) -> float | None:
    for header in entry["request"]["headers"]:
        if header["name"].lower() == "aimesh-timeout-ms":
            try:
                return float(header["value"])
            except ValueError:
                return None
    return None


def server_errors(entries: list[dict[str, Any]]) -> list[str]:
    """Every 5xx but a 504 for a deadline under 100 ms that the caller set itself, and a
    readiness probe's documented 503 ``{"ready": false}``."""
    out = []
    for e in entries:
        status = int(e["response"]["status"])
        text = e["response"].get("content", {}).get("text", "")
        if status < 500 or (status == 503 and '"ready": false' in text.replace('":false', '": false')):
            continue
        asked = asked_deadline_ms(e)
        if status == 504 and asked is not None and asked < TINY_DEADLINE_MS:
            continue
        out.append(f"{e['request']['method']} {e['request']['url']} -> {status} {text[:300]}")
    return out


async def fuzz(base: str, har: Path) -> tuple[int, str, list[dict[str, Any]]]:
    config = har.with_suffix(".toml")
    config.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *schemathesis_args(base, har, config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=har.parent,  # schemathesis keeps a cache in .schemathesis/ where it runs
    )
    out, _ = await proc.communicate()
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    return proc.returncode or 0, out.decode(errors="replace"), entries


async def deploy_models(nc: NatsClient, names: Names) -> None:
    await register_mlp(nc, names, seed=1)
    await register_lm(nc, names)
    for model in ("digits", "lm"):
        await request(nc, names.deploy, DeployRequest(model=model), Deployment)
    await eventually(lambda: serving(nc, names, "digits@1"), 60, "the worker to serve digits@1")
    await eventually(lambda: serving(nc, names, "lm@1"), 60, "the worker to serve lm@1")


@pytest.mark.timeout(300)
async def test_the_live_api_conforms_to_its_openapi_document(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    base = os.environ.get("AIMESH_FUZZ_BASE", "")
    router = None
    if not base:
        _, router, base = await start_gateway(spawn, nats_url, names, router_env={"AIMESH_ROUTER_TIMEOUT_S": "5"})
        await deploy_models(nc, names)
    code, out, entries = await fuzz(base, Path(os.environ.get("AIMESH_FUZZ_HAR", tmp_path / "fuzz.har")))
    counts, errors = status_counts(entries), server_errors(entries)
    print(f"\nschemathesis {len(entries)} requests, by status: {counts}; server errors: {len(errors)}")
    print("\n".join(errors[:20]))
    print(out[-6000:])
    assert entries, out
    assert not errors, "\n".join(errors)
    assert code == 0, out  # no check failed: no undocumented status, no non-conforming body
    if router is not None:
        assert router.proc.poll() is None and "Traceback" not in router.output(), router.output()


def test_a_top_p_below_float32s_least_samples_the_likeliest_token() -> None:
    """Found by the fuzzer: top_p 5e-324 is 0 in float32, so nucleus sampling kept no token and
    torch.multinomial raised (a 500 from /v1/completions)."""
    import torch

    from zoo.lm import causal_lm

    torch.manual_seed(0)
    model = causal_lm(vocab=257, dim=16, layers=1, heads=2, context=16).eval()
    idx = torch.tensor([[1, 2, 3]])
    greedy = list(model.generate(idx, 4, temperature=0.0))
    assert list(model.generate(idx, 4, temperature=1.0, top_p=5e-324)) == greedy
