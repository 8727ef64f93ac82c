"""TLS on the bus: `aimesh up --tls` makes a local CA, the embedded server requires TLS, mesh
processes trust the CA; and nothing listens beyond loopback unprotected unless told to."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats
import pytest

from aimesh.supervisor import Supervisor
from shared import auth
from shared.config import MeshConfig, UpConfig
from shared.connect import connect, connect_single
from shared.errors import ConfigError
from shared.names import Names
from shared.tls import check_exposure, ensure_local_pki, is_loopback
from tests.helpers import ServiceProcess

NO_SERVICES = {"ingest": 0, "trainer": 0, "inference": 0, "router": 0, "metrics": 0}


async def test_the_embedded_server_requires_tls_and_the_mesh_trusts_its_ca(tmp_path: Path, names: Names) -> None:
    up = UpConfig(**NO_SERVICES, data_dir=str(tmp_path / "mesh"), port=0, http_port=0, tls=True)
    supervisor = Supervisor(up, nats_url=None, child_env={"AIMESH_PREFIX": names.prefix}, drain_timeout_s=5.0)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    try:
        await asyncio.wait_for(supervisor.started.wait(), 20)
        assert supervisor.pki is not None and supervisor.nats_url is not None
        assert supervisor.pki.key.stat().st_mode & 0o777 == 0o600
        env = supervisor.role_env("router")
        assert env["AIMESH_NATS_TLS_CA"] == str(supervisor.pki.ca) and "AIMESH_ROUTER_TLS_CERT" in env
        operator = MeshConfig(
            nats_url=supervisor.nats_url,
            prefix=names.prefix,
            nats_nkey=supervisor.seed("operator"),
            nats_tls_ca=str(supervisor.pki.ca),
        )
        nc = await asyncio.wait_for(connect(operator, "tls-test", role="operator"), 10)
        try:
            assert nc.is_connected
            await nc.flush()
        finally:
            await nc.close()

        # The right identity without TLS, and TLS that does not trust the mesh's CA: refused.
        plain = {"servers": [supervisor.nats_url], "allow_reconnect": False, "connect_timeout": 2}
        plain["nkeys_seed"] = supervisor.seed("operator")
        # (nats-py reports a failed certificate check to its error callback and keeps waiting,
        # hence the bound: what matters is that no connection is made.)
        stranger = ssl.create_default_context()  # the system's CAs only
        for options in (plain, plain | {"tls": stranger}):
            with pytest.raises((nats.errors.Error, OSError, ssl.SSLError, TimeoutError)):
                await asyncio.wait_for(connect_single(options), 5)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


def test_local_pki_is_kept_and_remade_for_new_hosts(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    first = pki.cert.read_bytes()
    assert ensure_local_pki(tmp_path / "tls").cert.read_bytes() == first  # kept
    assert ensure_local_pki(tmp_path / "tls", ("10.1.2.3", "mesh.example")).cert.read_bytes() != first
    context = ssl.create_default_context(cafile=str(pki.ca))
    assert context.cert_store_stats()["x509_ca"] == 1


def test_nothing_listens_beyond_loopback_unprotected_unless_overridden() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert is_loopback(host)
        check_exposure("x", host, protected=False, needs="keys", override=False, setting="s")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    with pytest.raises(ConfigError, match=r"would listen on 0\.0\.0\.0 without keys.*set s"):
        check_exposure("x", "0.0.0.0", protected=False, needs="keys", override=False, setting="s")
    check_exposure("x", "0.0.0.0", protected=True, needs="keys", override=False, setting="s")
    check_exposure("x", "0.0.0.0", protected=False, needs="keys", override=True, setting="s")


async def test_aimesh_up_refuses_a_public_bus_without_auth_and_tls(tmp_path: Path) -> None:
    for flags in ({"auth": False}, {"auth": True}, {"auth": False, "tls": True}):
        up = UpConfig(**NO_SERVICES, data_dir=str(tmp_path / "mesh"), port=0, http_port=0, host="0.0.0.0", **flags)
        supervisor = Supervisor(up, nats_url=None, child_env={}, drain_timeout_s=5.0)
        with pytest.raises(ConfigError, match="without authentication and TLS"):
            await supervisor.run(asyncio.Event())
        assert supervisor.server is None or not supervisor.server.running


def test_roles_seeds_are_required_to_match_the_server_config(tmp_path: Path) -> None:
    keys = auth.ensure_seeds(tmp_path)
    text = auth.server_config(Names("m"), keys)
    assert all(keys[role] in text for role in auth.ROLES)
    seeds = [auth.read_seed(auth.seed_path(tmp_path, role)).decode() for role in auth.ROLES]
    assert not any(seed in text for seed in seeds)  # only public keys in the server's config


async def test_the_router_serves_https_when_given_a_certificate(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, tmp_path: Path
) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    router = spawn(
        "services.router",
        AIMESH_ROUTER_PORT="0",
        AIMESH_ROUTER_TLS_CERT=str(pki.cert),
        AIMESH_ROUTER_TLS_KEY=str(pki.key),
    )
    ping = await router.wait_ready(nats_url, names.micro_name("router"))
    base = ping.metadata["http"]
    assert base.startswith("https://127.0.0.1:")
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v2/health/live", ssl=trusting) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):  # the system's CAs do not vouch for it
            await http.get(f"{base}/v2/health/live")
        with pytest.raises(aiohttp.ClientError):  # and it speaks no plain HTTP
            await http.get(base.replace("https://", "http://") + "/v2/health/live")


@pytest.mark.parametrize("service", ["router", "metrics"])
async def test_http_services_refuse_to_listen_publicly_without_keys(
    service: str, spawn: Callable[..., ServiceProcess]
) -> None:
    var = f"AIMESH_{service.upper()}"
    proc = spawn(f"services.{service}", **{f"{var}_HOST": "0.0.0.0", f"{var}_PORT": "0"})
    assert await asyncio.to_thread(proc.wait, 60) == 2
    assert "would listen on 0.0.0.0 without API keys" in proc.output()
    assert f"{var}_INSECURE" in proc.output()
