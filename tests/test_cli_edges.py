"""CLI commands on a mesh that has just started (buckets missing or empty) and on a closed pipe:
an answer and exit 0, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client as NatsClient

from shared.kv import open_bucket
from shared.names import Names

ROOT = Path(__file__).resolve().parent.parent


def aimesh(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "NATS_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "aimesh", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_datasets_on_an_empty_bucket_lists_none(nats_url: str, names: Names, nc: NatsClient) -> None:
    await open_bucket(nc.jetstream(), names.datasets_bucket, create=True)  # made, nothing in it yet
    out = aimesh("datasets", "--nats-url", nats_url, "--prefix", names.prefix)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_clearing_a_split_before_any_bucket_exists_is_done(nats_url: str, names: Names) -> None:
    out = aimesh("split", "digits", "--clear", "--nats-url", nats_url, "--prefix", names.prefix)
    assert out.returncode == 0, out.stderr
    assert "split removed" in out.stdout


def test_clearing_the_split_of_a_name_that_is_not_a_token_is_refused(nats_url: str, names: Names) -> None:
    for name in ("*", "a.b", "a b", ">"):
        out = aimesh("split", name, "--clear", "--nats-url", nats_url, "--prefix", names.prefix)
        assert out.returncode == 2 and "must be letters, digits" in out.stderr, (name, out.stderr)


def test_permissions_in_text_name_a_role_that_may_publish_nothing() -> None:
    out = aimesh("auth", "permissions", "--role", "supervisor")
    assert out.returncode == 0, out.stderr
    assert "publish: nothing" in out.stdout


def test_a_closed_pipe_ends_quietly() -> None:
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMESH_", "NATS_", "OTEL_"))}
    writer = subprocess.run(
        [sys.executable, "-m", "aimesh", "auth", "permissions"],
        cwd=ROOT,
        env=env,
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert reader.stdin is not None
    reader.stdin.close()
    reader.wait(10)
    assert writer.returncode == 0, writer.stderr
    assert "Traceback" not in writer.stderr
