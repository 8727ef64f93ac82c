"""The command line end to end: aimesh up / status / run, the supervisor's care of its services and
of the embedded nats-server, and the client commands (deploy, split, feedback, experiments show,
ingest, datasets) as the operator of a mesh, with real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest

from aimesh.commands.mesh import connect_once
from shared.auth import ROLES
from shared.connect import connect_single
from shared.names import Names
from shared.natsserver import pid_alive
from shared.schemas import Deployment, ExperimentReport, Split
from tests.helpers import AIMESH, ROOT, ServiceProcess, clean_env, eventually
from tests.mesh import register_mlp, report_when, serving

pytestmark = pytest.mark.slow

NO_SERVICES_BUT_ROUTER = ("--ingest", "0", "--trainer", "0", "--inference", "0", "--metrics", "0")


def _status(data_dir: Path, names: Names) -> list[dict[str, Any]]:
    out = subprocess.run(
        [*AIMESH, "status", "--json", "--data-dir", str(data_dir), "--prefix", names.prefix, "--wait", "0.5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=30,
    )
    # 1: no instance answered; 3: NATS not reachable yet (the mesh is still starting).
    if out.returncode not in (0, 1, 3):
        raise AssertionError(out.stderr)
    rows: list[dict[str, Any]] = json.loads(out.stdout) if out.returncode == 0 else []
    return rows


def _up(data_dir: Path, names: Names, *flags: str, stdout: Any, **env: str) -> subprocess.Popen[bytes]:
    """``aimesh up`` on free ports in ``data_dir`` for this test's mesh (router and metrics on
    free ports too, unless ``env`` says otherwise)."""
    env = {"AIMESH_ROUTER_PORT": "0", "AIMESH_METRICS_PORT": "0", **env}
    command = [*AIMESH, "up", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir), "--prefix", names.prefix]
    return subprocess.Popen([*command, *flags], cwd=ROOT, env=clean_env(**env), stdout=stdout, stderr=subprocess.STDOUT)


def _ready(
    up: subprocess.Popen[bytes], data_dir: Path, names: Names, log_path: Path, counts: dict[str, int]
) -> Callable[[], Any]:
    """A check for ``eventually``: the mesh's rows once exactly ``counts`` instances are ready."""

    async def check() -> list[dict[str, Any]]:
        if up.poll() is not None:
            raise AssertionError(f"aimesh up exited with {up.returncode}:\n{log_path.read_text()}")
        rows = await asyncio.to_thread(_status, data_dir, names)
        found: dict[str, int] = {}
        for r in rows:
            if r["state"] == "ready":
                found[r["service"]] = found.get(r["service"], 0) + 1
        return rows if found == counts and len(rows) == sum(counts.values()) else []

    return check


@pytest.mark.timeout(300)
async def test_up_status_restart_and_sigterm_leave_nothing_behind(tmp_path: Path, names: Names) -> None:
    data_dir = tmp_path / "mesh"
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = _up(data_dir, names, stdout=log)
    try:

        async def seven() -> list[dict[str, Any]]:
            if up.poll() is not None:
                raise AssertionError((tmp_path / "up.log").read_text())
            rows = await asyncio.to_thread(_status, data_dir, names)
            return rows if len(rows) == 7 and all(r["state"] == "ready" for r in rows) else []

        rows = await eventually(seven, 60, "seven ready instances")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["service"]] = counts.get(r["service"], 0) + 1
        assert counts == {"ingest": 1, "trainer": 2, "inference": 2, "router": 1, "metrics": 1}
        state = json.loads((data_dir / "mesh.json").read_text())
        assert state["nats_url"].startswith("nats://")
        # The bus admits the mesh's identities only; their seeds are private to the user.
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect_single({"servers": [state["nats_url"]], "allow_reconnect": False, "connect_timeout": 2})
        seeds = sorted(Path(state["credentials"]).iterdir())
        assert [p.name for p in seeds] == sorted(f"{role}.nk" for role in ROLES)
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in seeds)
        nats_pid = _nats_server_pid(data_dir / "nats")

        # A crashed instance is restarted by the supervisor.
        victim = next(r for r in rows if r["service"] == "inference")
        os.kill(int(victim["pid"]), signal.SIGKILL)

        async def replaced() -> list[dict[str, Any]]:
            rows = await asyncio.to_thread(_status, data_dir, names)
            inf = [r for r in rows if r["service"] == "inference" and r["state"] == "ready"]
            return rows if len(inf) == 2 and victim["pid"] not in {r["pid"] for r in inf} else []

        rows = await eventually(replaced, 60, "the killed instance to be replaced")

        up.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.wait, 60) == 0
        pids = [int(r["pid"]) for r in rows] + [nats_pid]
        assert [p for p in pids if pid_alive(p)] == []
        assert not (data_dir / "mesh.json").exists()
        text = (tmp_path / "up.log").read_text()
        assert "exited with code -9; restarting" in text
    finally:
        if up.poll() is None:
            up.kill()
        log.close()


def _nats_server_pid(store_dir: Path) -> int:
    """The embedded nats-server's pid, found by its store directory in the process table."""
    found = _nats_server(store_dir)
    if found is None:
        raise AssertionError(f"no nats-server with store {store_dir} is running")
    return found[0]


def _nats_server(store_dir: Path) -> tuple[int, list[str]] | None:
    """The pid and arguments of the nats-server whose store is ``store_dir``, if one runs."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "nats-server" in line and str(store_dir) in line:
            pid, *args = line.split()
            return int(pid), args
    return None


@pytest.mark.timeout(180)
async def test_the_supervisor_restarts_a_killed_nats_server_on_its_port_and_services_reconnect(
    tmp_path: Path, names: Names
) -> None:
    data_dir = tmp_path / "mesh"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = _up(data_dir, names, "--ingest", "0", "--trainer", "0", "--inference", "0", "--metrics", "0", stdout=log)
        try:
            (router,) = await eventually(_ready(up, data_dir, names, log_path, {"router": 1}), 60, "the router")
            url = json.loads((data_dir / "mesh.json").read_text())["nats_url"]
            port = url.rsplit(":", 1)[1]
            killed = _nats_server_pid(data_dir / "nats")
            os.kill(killed, signal.SIGKILL)

            async def restarted() -> tuple[int, list[str]] | None:
                found = _nats_server(data_dir / "nats")
                return found if found is not None and found[0] != killed else None

            _, args = await eventually(restarted, 30, "a new nats-server on the same store")
            assert args[args.index("-p") + 1] == port  # the port the services know
            assert json.loads((data_dir / "mesh.json").read_text())["nats_url"] == url

            async def reconnected() -> list[dict[str, Any]]:
                # Discovery through the new server answers only once the service is back on it.
                rows = await asyncio.to_thread(_status, data_dir, names)
                return (
                    rows
                    if [(r["id"], r["pid"], r["state"]) for r in rows] == [(router["id"], router["pid"], "ready")]
                    else []
                )

            await eventually(reconnected, 60, "the same router process to answer through the new server")
            up.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(up.wait, 60) == 0
        finally:
            if up.poll() is None:
                up.kill()
    text = log_path.read_text()
    assert "nats-server exited with code -9; restarting it" in text, text[-3000:]
    assert "router#0 exited" not in text  # reconnected, never restarted


@pytest.mark.parametrize("command", [["-m", "services.router"], ["-m", "aimesh", "run", "router"]])
async def test_router_runs_in_the_foreground_with_health(
    command: list[str], spawn: Callable[..., ServiceProcess], nats_url: str, names: Names
) -> None:
    router = spawn(command, AIMESH_ROUTER_PORT="0")
    ping = await router.wait_ready(nats_url, names.micro_name("router"))
    base = ping.metadata["http"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v2/health/live") as resp:
            assert resp.status == 200 and await resp.json() == {"live": True}
        async with http.get(f"{base}/v2/health/ready") as resp:
            assert resp.status == 200 and await resp.json() == {"ready": True}
        async with http.get(f"{base}/v2") as resp:
            assert (await resp.json())["name"] == "aimesh"
    router.terminate()
    assert await asyncio.to_thread(router.wait, 30) == 0, router.output()


@pytest.mark.timeout(180)
async def test_a_killed_supervisor_leaves_no_orphans(tmp_path: Path, names: Names) -> None:
    data_dir = tmp_path / "mesh"
    up = _up(data_dir, names, "--trainer", "1", "--inference", "1", stdout=subprocess.DEVNULL)
    try:

        async def five() -> list[dict[str, Any]]:
            rows = await asyncio.to_thread(_status, data_dir, names)
            return rows if len(rows) == 5 else []

        rows = await eventually(five, 60, "five instances")
        pids = [int(r["pid"]) for r in rows] + [_nats_server_pid(data_dir / "nats")]
        up.kill()
        up.wait()

        async def all_gone() -> bool:
            return not any(pid_alive(p) for p in pids)

        await eventually(all_gone, 30, "every child of the killed supervisor to exit")
    finally:
        if up.poll() is None:
            up.kill()


@pytest.mark.timeout(180)
async def test_a_crash_loop_is_reported_loudly(tmp_path: Path, names: Names) -> None:
    # A router that cannot start (its port setting is not a number) exits with code 2 each time.
    data_dir = tmp_path / "mesh"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = _up(
            data_dir,
            names,
            "--ingest",
            "0",
            "--trainer",
            "0",
            "--inference",
            "0",
            "--metrics",
            "0",
            stdout=log,
            AIMESH_ROUTER_PORT="eighty",
            AIMESH_UP_RESTART_BACKOFF_S="0.05",
            AIMESH_UP_CRASH_LOOP_RESTARTS="3",
        )
        try:

            async def looping() -> bool:
                state = json.loads((data_dir / "mesh.json").read_text()) if (data_dir / "mesh.json").exists() else {}
                return state.get("crash_loops") == ["router#0"]

            await eventually(looping, 60, "the crash loop to be recorded")
            up.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(up.wait, 30) == 0
        finally:
            if up.poll() is None:
                up.kill()
    text = log_path.read_text()
    assert "CRITICAL" in text and "CRASH LOOP: router#0 exited with code 2" in text
    assert "AIMESH_ROUTER_PORT: Expected `int`" in text  # the service said why


@pytest.mark.timeout(420)  # the demo itself may take up to 300 s on two cores
async def test_demo_ingests_the_built_in_data_and_exits(tmp_path: Path, names: Names) -> None:
    out = await asyncio.to_thread(
        subprocess.run,
        [
            *AIMESH,
            "demo",
            "--exit",
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(tmp_path / "mesh"),
            "--prefix",
            names.prefix,
        ],
        cwd=ROOT,
        env=clean_env(AIMESH_ROUTER_PORT="0", AIMESH_METRICS_PORT="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dataset digits@1  (csv, 1,797 records, 0 rejected" in out.stdout
    assert "dataset pytext@1  (text," in out.stdout and "tokenizer: bytes, vocab 257" in out.stdout
    assert "model digits@1: classify" in out.stdout and "model pylm@1: lm" in out.stdout
    accuracy = float(out.stdout.split("eval_accuracy ", 1)[1].split(",", 1)[0])
    assert accuracy >= 0.9
    served = [line for line in out.stdout.splitlines() if line.startswith("  user ")]
    assert len(served) == 6 and {line.split("served by digits@")[1][0] for line in served} <= {"1", "2"}
    right = sum(line.split("true ")[1].split(",")[0] == line.rsplit("predicted ", 1)[1] for line in served)
    assert right >= 4
    assert "model digits@2: classify, zoo.classifier:cnn" in out.stdout
    assert "POST " in out.stdout and "/v1/completions  (stream: true)" in out.stdout
    # The experiment: simulated feedback where v2 converts better, until v2 is promoted.
    assert "== experiment " in out.stdout and "verdict: promoted (v2)" in out.stdout, out.stdout[-3000:]
    assert "dashboard: http://" in out.stdout and "/metrics" in out.stdout


async def test_ingest_and_datasets_commands(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, tmp_path: Path
) -> None:
    ingest = spawn("services.ingest", AIMESH_INGEST_ROOTS=str(tmp_path))
    await ingest.wait_ready(nats_url, names.micro_name("ingest"))
    (tmp_path / "t.csv").write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(100)))
    common = ["--nats-url", nats_url, "--prefix", names.prefix]

    def aimesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AIMESH, *args, *common], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
        )

    done = await asyncio.to_thread(
        aimesh, "ingest", str(tmp_path / "t.csv"), "--dataset", "t", "--label", "label", "--shards", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["manifest"]["records"] == 100 and result["job"]["state"] == "complete"

    listed = await asyncio.to_thread(aimesh, "datasets", "--json")
    assert [(m["dataset"], m["version"]) for m in json.loads(listed.stdout)] == [("t", "1")]
    shown = await asyncio.to_thread(aimesh, "datasets", "show", "t@1")
    assert shown.returncode == 0 and "dataset t@1" in shown.stdout and "sha256" in shown.stdout
    missing = await asyncio.to_thread(aimesh, "datasets", "show", "nope")
    assert missing.returncode == 1 and "no dataset named 'nope'" in missing.stderr
    bad = await asyncio.to_thread(aimesh, "ingest", str(tmp_path / "absent.csv"), "--dataset", "t")
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr


@pytest.mark.timeout(300)
async def test_deploy_split_feedback_and_experiments_show_as_the_operator_of_aimesh_up(
    tmp_path: Path, names: Names, http: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "mesh"
    log_path = tmp_path / "up.log"
    counts = {"inference": 1, "router": 1, "metrics": 1}
    flags = ["--ingest", "0", "--trainer", "0", "--inference", "1", "--router", "1", "--metrics", "1"]

    def aimesh(*args: str) -> subprocess.CompletedProcess[str]:
        # No URL and no identity given: the commands find both through <data_dir>/mesh.json.
        command = [*AIMESH, *args, "--data-dir", str(data_dir), "--prefix", names.prefix]
        return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)

    with open(log_path, "wb") as log:
        up = _up(data_dir, names, *flags, stdout=log)
        try:
            rows = await eventually(_ready(up, data_dir, names, log_path, counts), 90, f"{counts} ready")
            base = next(r["http"] for r in rows if r["service"] == "router")
            state = json.loads((data_dir / "mesh.json").read_text())
            operator = str(Path(state["credentials"]) / "operator.nk")
            nc = await connect_once(state["nats_url"], nkey=operator, prefix=names.prefix)
            try:
                for seed in (1, 2):
                    await register_mlp(nc, names, seed=seed)

                done = await asyncio.to_thread(aimesh, "deploy", "digits@1")
                assert done.returncode == 0, done.stderr
                assert done.stdout.startswith("deployed digits@1 (from 1); batches of up to 32"), done.stdout
                done = await asyncio.to_thread(aimesh, "deploy", "digits@2", "--json")
                assert done.returncode == 0, done.stderr
                deployed = msgspec.json.decode(done.stdout, type=Deployment)
                assert (deployed.model, deployed.version) == ("digits", "2")
                for want in ("digits@1", "digits@2"):
                    await eventually(lambda w=want: serving(nc, names, w), 60, f"{want} to be served")  # type: ignore[misc]

                done = await asyncio.to_thread(
                    aimesh, "split", "digits", "1=50", "2=50", "--control", "1", "--min-samples", "50", "--report-only"
                )
                assert done.returncode == 0, done.stderr
                assert done.stdout.startswith("digits: v1 50, v2 50; experiment ") and "report only" in done.stdout

                async def routed_by_split() -> Split | None:
                    async with http.get(f"{base}/admin/splits/digits") as resp:
                        assert resp.status in (200, 404), await resp.text()  # 404 until the router has it
                        return msgspec.json.decode(await resp.read(), type=Split) if resp.status == 200 else None

                split = await eventually(routed_by_split, 20, "the router to follow the split")
                assert split.guardrails is not None and not split.guardrails.auto
                body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
                async with http.post(f"{base}/v2/models/digits/infer", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    request_id, variant = resp.headers["Aimesh-Request-Id"], resp.headers["Aimesh-Variant"]

                done = await asyncio.to_thread(aimesh, "feedback", "digits", request_id, "1")
                assert done.returncode == 0, done.stderr
                assert done.stdout.strip() == f"digits: reward 1 recorded for request {request_id}"

                async def rewarded() -> ExperimentReport | None:
                    return await report_when(
                        nc,
                        names,
                        lambda r: (
                            [(v.version, v.requests, v.rewards) for v in r.variants if v.requests] == [(variant, 1, 1)]
                        ),
                    )

                await eventually(rewarded, 30, f"the request and its reward counted for v{variant}")
            finally:
                await nc.close()

            shown = await asyncio.to_thread(aimesh, "experiments", "show", "digits")
            assert shown.returncode == 0, shown.stderr
            lines = shown.stdout.splitlines()
            assert lines[0] == f"digits  experiment {split.experiment}  state running  control v1"
            assert lines[1].startswith("verdict: waiting: waiting for 50 rewards per variant")
            row = next(line.split() for line in lines if line.startswith(f"  v{variant} "))
            assert (row[1], row[2], row[7]) == ("50", "1", "1")  # weight, requests, rewards
            as_json = await asyncio.to_thread(aimesh, "experiments", "show", "digits", "--json")
            report = msgspec.json.decode(as_json.stdout, type=ExperimentReport)
            assert (report.experiment, report.state, report.verdict) == (split.experiment, "running", "waiting")

            # Refusals: exit code 2 and what is wrong.
            for args, why in (
                (("experiments", "show", "nope"), "has no split"),
                (("feedback", "digits", "has space", "1"), "request id"),
                (("deploy", "nope"), "has no version or alias"),
            ):
                done = await asyncio.to_thread(aimesh, *args)
                assert done.returncode == 2 and why in done.stderr, (args, done.returncode, done.stderr)

            up.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(up.wait, 60) == 0
        finally:
            if up.poll() is None:
                up.kill()


@pytest.mark.timeout(180)
async def test_up_with_tls_serves_https_and_the_cli_finds_the_ca(tmp_path: Path, names: Names) -> None:
    data_dir = tmp_path / "mesh"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = _up(data_dir, names, "--tls", *NO_SERVICES_BUT_ROUTER, stdout=log)
        try:

            async def router_ready() -> list[dict[str, Any]]:
                if up.poll() is not None:
                    raise AssertionError(log_path.read_text())
                rows = await asyncio.to_thread(_status, data_dir, names)  # over TLS, CA from mesh.json
                return [r for r in rows if r["service"] == "router" and r["state"] == "ready"]

            rows = await eventually(router_ready, 90, "the router over a TLS bus")
            assert rows[0]["http"].startswith("https://127.0.0.1:")
            state = json.loads((data_dir / "mesh.json").read_text())
            assert state["tls_ca"] and state["nats_url"].startswith("tls://")
            up.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(up.wait, 60) == 0
        finally:
            if up.poll() is None:
                up.kill()


def test_up_refuses_a_public_address_without_tls(tmp_path: Path, names: Names) -> None:
    out = subprocess.run(
        [*AIMESH, "up", "--host", "0.0.0.0", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "would listen on 0.0.0.0 without authentication and TLS" in out.stderr
    assert "AIMESH_UP_INSECURE" in out.stderr
