"""The request path's guards: durable requests only for deployed versions and bounded streams
(against a real nats-server), API keys kept as digests with scopes, the metrics dashboard behind
keys (over real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy
from yarl import URL

from services.router.service import RouterService
from shared import apikeys, durable
from shared.apikeys import KeyRing, hashed_entry, presented_key
from shared.config import DurableConfig, MeshConfig, RouterConfig, load_durable_config
from shared.errors import BadRequest, ConfigError, NotFound, Overloaded
from shared.names import Names
from shared.schemas import Deployment, InferRequest
from shared.tensors import to_wire
from tests.helpers import ServiceProcess, eventually

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 1.0, 2.0, 3.0]}]}
REQ = InferRequest(inputs={"x": to_wire(np.zeros((1, 4), dtype=np.float32))})

# -- API keys (pure) ------------------------------------------------------------------------------


def test_keys_are_kept_only_as_digests_and_hashed_entries_work() -> None:
    ring = KeyRing.parse(["plain-secret:infer", hashed_entry("hashed-secret", "admin")], ("infer", "admin"))
    assert len(ring) == 2
    assert ring.scope_of("plain-secret") == "infer"
    assert ring.scope_of("hashed-secret") == "admin"
    assert ring.scope_of("hashed-secret ") is None and ring.scope_of("") is None and ring.scope_of(None) is None
    # Nothing in the ring is the key's text: only 32-byte digests and scopes.
    kept = vars(ring)["_entries"]
    assert [(len(d), s) for d, s in kept] == [(32, "infer"), (32, "admin")]
    assert b"plain-secret" not in b"".join(d for d, _ in kept) and "plain-secret" not in repr(vars(ring))
    assert kept[0][0] == hashlib.sha256(b"plain-secret").digest()


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("s3cret:root", "entry 1 is not KEY:SCOPE"),
        ("s3cret", "entry 1 is not KEY:SCOPE"),
        (":infer", "entry 1 has an empty key"),
        ("sha256:abcd:infer", "the digest must be 64 hex digits"),
        ("sha256:" + "zz" * 32 + ":infer", "the digest must be 64 hex digits"),
    ],
)
def test_malformed_key_entries_are_refused_without_echoing_the_key(entry: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        KeyRing.parse([entry], ("infer", "admin"))
    assert "s3cret" not in str(info.value)


def test_a_key_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="entry 2 repeats a key"):
        KeyRing.parse(["k:infer", hashed_entry("k", "admin")], ("infer", "admin"))


def test_the_presented_key_comes_from_bearer_x_api_key_or_basic() -> None:
    basic = base64.b64encode(b"anyone:the-key").decode()
    assert presented_key({"Authorization": "Bearer the-key"}) == "the-key"
    assert presented_key({"Authorization": "bearer the-key"}) == "the-key"
    assert presented_key({"X-API-Key": "the-key"}) == "the-key"
    assert presented_key({"Authorization": f"Basic {basic}"}) == "the-key"
    assert presented_key({"Authorization": "Basic !!!"}) is None
    assert presented_key({}) is None


def test_the_apikeys_tool_prints_a_hashed_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("typed-key\n"))
    assert apikeys.main(["hash", "admin"]) == 0
    entry = capsys.readouterr().out.strip()
    assert entry == f"sha256:{hashlib.sha256(b'typed-key').hexdigest()}:admin"
    assert KeyRing.parse([entry], ("admin",)).scope_of("typed-key") == "admin"
    assert apikeys.main(["new", "infer"]) == 0
    key_line, entry_line = capsys.readouterr().out.splitlines()
    key = key_line.removeprefix("key:").strip()
    assert KeyRing.parse([entry_line.removeprefix("entry:").strip()], ("infer",)).scope_of(key) == "infer"


# -- durable requests (pure) ----------------------------------------------------------------------


def test_durable_config_reads_the_durable_table_and_variables() -> None:
    assert load_durable_config({}) == DurableConfig()
    cfg = load_durable_config({"AIMESH_DURABLE_REQUESTS_MAX_MSGS": "5", "AIMESH_DURABLE_RESULTS_MAX_AGE_S": "60"})
    assert (cfg.requests_max_msgs, cfg.results_max_age_s, cfg.requests_max_bytes) == (5, 60.0, 1024**3)
    with pytest.raises(ConfigError, match="AIMESH_DURABLE_REQUESTS_MAX_BYTES"):
        load_durable_config({"AIMESH_DURABLE_REQUESTS_MAX_BYTES": "lots"})


def test_durable_names_must_be_tokens_and_versions_deployed() -> None:
    deployed = [
        Deployment(model="digits", ref="latest", version="2", previous="1"),
        Deployment(model="m", ref="3", version="3"),
    ]
    durable.check_deployed(deployed, "digits", "2")
    for version in ("*", ">", "1.2", "a b", ""):
        with pytest.raises(BadRequest, match="must be letters, digits"):
            durable.check_deployed(deployed, "digits", version)
    with pytest.raises(BadRequest, match=r"model 'a\.b'"):
        durable.check_deployed(deployed, "a.b", "1")
    with pytest.raises(NotFound, match=r"model 'nosuchmodel' is not deployed"):
        durable.check_deployed(deployed, "nosuchmodel", "1")
    with pytest.raises(NotFound, match=r"version '99' of model 'digits' is not deployed \(deployed: 2;"):
        durable.check_deployed(deployed, "digits", "99")
    with pytest.raises(NotFound, match="version '1'"):  # replaced by a redeployment: retired soon
        durable.check_deployed(deployed, "digits", "1")


# -- durable requests through the router and NATS ------------------------------------------------


# The small stream limits of every test mesh (as TEST_STREAM_LIMITS gives the services it starts).
TEST_DURABLE = DurableConfig(requests_max_bytes=16 * 1024 * 1024, results_max_bytes=16 * 1024 * 1024)


@asynccontextmanager
async def router_with(
    config: MeshConfig, router: RouterConfig | None = None, durable: DurableConfig = TEST_DURABLE
) -> AsyncIterator[tuple[RouterService, str]]:
    """A router in this process, on a free port unless ``router`` says otherwise; yields it and
    its URL."""
    async with RouterService(config, router or RouterConfig(port=0), durable) as service:
        yield service, service.http_url


async def deploy_record(nc: NatsClient, names: Names, model: str, version: str) -> None:
    """A deployment record, as `aimesh deploy` leaves it (no worker needed to accept requests)."""
    kv = await nc.jetstream().key_value(names.deployments_bucket)
    record = Deployment(model=model, ref=version, version=version, updated_at="2026-01-01T00:00:00Z")
    await kv.put(f"deploy.{model}.{version}", msgspec.json.encode(record))


async def queued(nc: NatsClient, names: Names) -> int:
    return (await nc.jetstream().stream_info(names.requests_stream)).state.messages


async def test_async_infer_for_what_is_not_deployed_is_refused_and_queues_nothing(
    mesh_config: MeshConfig, names: Names, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    async with router_with(mesh_config) as (router, base):
        await deploy_record(nc, names, "digits", "1")
        await eventually(lambda: _has(router, "digits"), 10, "the router to see digits@1")
        cases = [
            ("nosuchmodel/versions/1", 404, "model 'nosuchmodel' is not deployed"),
            ("digits/versions/99", 404, "version '99' of model 'digits' is not deployed (deployed: 1;"),
            ("digits/versions/*", 400, "version '*' must be letters"),
            ("digits/versions/%3E", 400, "version '>' must be letters"),
            ("digits/versions/1.2", 400, "version '1.2' must be letters"),
            ("a.b/versions/1", 400, "model 'a.b' must be letters"),
            ("nosuchmodel", 404, "model 'nosuchmodel' is not deployed"),
        ]
        for path, status, reason in cases:
            for how in ({"params": {"async": "1"}}, {"headers": {"Prefer": "respond-async"}}):
                url = URL(f"{base}/v2/models/{path}/infer", encoded=True)
                async with http.post(url, json=BODY, **how) as resp:  # type: ignore[arg-type]
                    body = await resp.json()
                    assert (resp.status, reason in body.get("error", "")) == (status, True), (path, body)
        assert await queued(nc, names) == 0
        results = await nc.jetstream().stream_info(names.results_stream)
        assert results.state.messages == 0  # no "pending" record left behind either

        # NATS programs: the same refusals, deployments read from the bucket.
        js = nc.jetstream()
        with pytest.raises(NotFound, match="'nosuchmodel' is not deployed"):
            await durable.submit(js, names, "nosuchmodel", "1", REQ)
        with pytest.raises(NotFound, match="version '99'"):
            await durable.submit(js, names, "digits", "99", REQ)
        for version in ("*", ">"):
            with pytest.raises(BadRequest, match="must be letters"):
                await durable.submit(js, names, "digits", version, REQ)
        assert await queued(nc, names) == 0

        # What is deployed is accepted, over NATS and HTTP.
        rid = await durable.submit(js, names, "digits", "1", msgspec.structs.replace(REQ, id="nats-1"))
        assert (await durable.fetch(js, names, rid)).state == "pending"
        async with http.post(f"{base}/v2/models/digits/versions/1/infer?async=1", json=BODY) as resp:
            assert resp.status == 202, await resp.text()
            assert resp.headers["Aimesh-Variant"] == "1"
        async with http.post(f"{base}/v2/models/digits/infer?async=1", json=BODY) as resp:
            assert resp.status == 202, await resp.text()
        assert await queued(nc, names) == 3


async def _has(router: RouterService, model: str) -> bool:
    return model in router.table.models()


async def test_the_request_streams_carry_their_limits_and_a_full_queue_refuses(
    mesh_config: MeshConfig, names: Names, nc: NatsClient, http: aiohttp.ClientSession
) -> None:
    limits = DurableConfig(
        requests_max_msgs=3,
        requests_max_bytes=1 << 20,
        requests_max_age_s=3600,
        results_max_bytes=2 << 20,
        results_max_age_s=7200,
    )
    async with router_with(mesh_config, durable=limits) as (router, base):
        js = nc.jetstream()
        requests = (await js.stream_info(names.requests_stream)).config
        assert (requests.max_msgs, requests.max_bytes, requests.max_age, requests.discard) == (
            3,
            1 << 20,
            3600,
            DiscardPolicy.NEW,
        )
        results = (await js.stream_info(names.results_stream)).config
        assert (results.max_bytes, results.max_age, results.discard, results.max_msgs_per_subject) == (
            2 << 20,
            7200,
            DiscardPolicy.OLD,
            1,
        )

        await deploy_record(nc, names, "digits", "1")
        await eventually(lambda: _has(router, "digits"), 10, "the router to see digits@1")
        for i in range(3):
            body = {**BODY, "id": f"r{i}"}
            async with http.post(f"{base}/v2/models/digits/infer?async=1", json=body) as resp:
                assert resp.status == 202, await resp.text()
        async with http.post(f"{base}/v2/models/digits/infer?async=1", json={**BODY, "id": "r3"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "5"
            reason = (await resp.json())["error"]
        assert "is full" in reason and "3 requests waiting (limit 3)" in reason and "nothing was queued" in reason
        # The refused request left nothing behind; the accepted ones are all still there.
        async with http.get(f"{base}/v2/results/r3") as resp:
            assert resp.status == 404
        for i in range(3):
            async with http.get(f"{base}/v2/results/r{i}") as resp:
                assert resp.status == 202
        assert await queued(nc, names) == 3
        with pytest.raises(Overloaded, match="is full"):
            await durable.submit(js, names, "digits", "1", msgspec.structs.replace(REQ, id="over"))
        # A resubmitted id is deduplicated, not refused, while it waits.
        async with http.post(f"{base}/v2/models/digits/infer?async=1", json={**BODY, "id": "r0"}) as resp:
            assert resp.status == 202


@pytest.mark.slow
async def test_inference_workers_declare_the_streams_from_the_same_settings(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, nc: NatsClient
) -> None:
    worker = spawn("services.inference", AIMESH_DURABLE_REQUESTS_MAX_MSGS="7", AIMESH_DURABLE_RESULTS_MAX_AGE_S="600")
    await worker.wait_ready(nats_url, names.micro_name("inference"), timeout_s=60)
    js = nc.jetstream()
    requests = (await js.stream_info(names.requests_stream)).config
    results = (await js.stream_info(names.results_stream)).config
    assert (requests.max_msgs, requests.discard, results.max_age, results.discard) == (
        7,
        DiscardPolicy.NEW,
        600,
        DiscardPolicy.OLD,
    )


# -- API keys on the router ----------------------------------------------------------------------


async def test_router_api_keys_hashed_entries_scopes_and_every_admin_route(
    mesh_config: MeshConfig, http: aiohttp.ClientSession
) -> None:
    keys = [hashed_entry("user-key", "infer"), "boss-key:admin"]
    async with router_with(mesh_config, RouterConfig(port=0, api_keys=keys)) as (router, base):
        user, boss = {"Authorization": "Bearer user-key"}, {"X-API-Key": "boss-key"}
        for open_path in ("/v2/health/live", "/openapi.json"):
            async with http.get(f"{base}{open_path}") as resp:
                assert resp.status == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "user-key2"},
            {"Authorization": "user-key"},
        ):
            async with http.get(f"{base}/v2", headers=headers) as resp:
                assert resp.status == 401 and "API key is required" in (await resp.json())["error"]
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(f"{base}/v2", headers=user) as resp:  # the hashed entry's key
            assert resp.status == 200
        async with http.post(f"{base}/v2/models/digits/infer", json=BODY, headers=boss) as resp:
            assert resp.status == 404  # past the keys: admin may infer, digits is not deployed

        # Every route under /admin, every method, needs the admin scope.
        assert router._runner is not None
        admin = sorted(
            {
                (route.method, route.resource.canonical)
                for route in router._runner.app.router.routes()
                if route.resource is not None and route.resource.canonical.startswith("/admin/")
            }
        )
        assert {m for m, _ in admin} >= {"GET", "HEAD", "PUT", "DELETE"}
        split = {"model": "digits", "variants": [{"version": "1", "weight": 1}]}
        for method, template in admin:
            url = base + template.replace("{model}", "digits")
            for headers, status in (({}, 401), (user, 403)):
                async with http.request(method, url, json=split, headers=headers) as resp:
                    assert resp.status == status, (method, template, headers)
                    if method != "HEAD":
                        error = (await resp.json())["error"]
                        assert status == 401 or "needs the admin scope" in error
        # The same path spelt another way is still an admin path.
        async with http.get(URL(f"{base}/%61dmin/splits/digits", encoded=True), headers=user) as resp:
            assert resp.status == 403
        # The admin key reaches the handlers (no model is registered: they answer 404 themselves).
        async with http.put(f"{base}/admin/splits/digits", json=split, headers=boss) as resp:
            assert resp.status == 404 and "has no version 1" in (await resp.json())["error"]
        async with http.get(f"{base}/admin/splits/digits", headers=boss) as resp:
            assert resp.status == 404 and "has no split" in (await resp.json())["error"]
        async with http.delete(f"{base}/admin/splits/digits", headers=boss) as resp:
            assert resp.status == 204


async def test_a_malformed_router_key_entry_stops_the_router(mesh_config: MeshConfig) -> None:
    with pytest.raises(ConfigError, match=r"\[router\] api_keys: entry 2 is not"):
        async with router_with(mesh_config, RouterConfig(port=0, api_keys=["a:infer", "b:root"])):
            pass


# -- API keys on the metrics service -------------------------------------------------------------


async def start_metrics(spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, **env: str) -> str:
    """A metrics service process on a free port; returns its URL."""
    proc = spawn("services.metrics", AIMESH_METRICS_PORT="0", **env)
    return str((await proc.wait_ready(nats_url, names.micro_name("metrics"))).metadata["http"])


async def test_the_dashboard_and_its_api_need_a_key_and_metrics_stays_open(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    base = await start_metrics(
        spawn, nats_url, names, AIMESH_METRICS_API_KEYS=f'["{hashed_entry("viewer-key", "read")}"]'
    )
    for path in ("/", "/dashboard", "/api/overview", "/api/experiments", "/api/traces", "/api/traces/abc"):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with http.get(f"{base}{path}", headers=headers) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"].startswith("Basic")  # a browser asks for it
                assert "API key is required" in (await resp.json())["error"]
    async with http.get(f"{base}/api/overview", headers={"Authorization": "Bearer viewer-key"}) as resp:
        assert resp.status == 200 and "series" in await resp.json()
    basic = {"Authorization": "Basic " + base64.b64encode(b"me:viewer-key").decode()}  # what a browser sends
    async with http.get(f"{base}/", headers=basic) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200  # metrics_open by default: scrapers send no key


async def test_metrics_can_be_closed_too_and_without_keys_all_is_open(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names, http: aiohttp.ClientSession
) -> None:
    closed = await start_metrics(
        spawn, nats_url, names, AIMESH_METRICS_API_KEYS="scraper-key:read", AIMESH_METRICS_METRICS_OPEN="false"
    )
    async with http.get(f"{closed}/metrics") as resp:
        assert resp.status == 401
    async with http.get(f"{closed}/metrics", headers={"X-API-Key": "scraper-key"}) as resp:
        assert resp.status == 200
    open_ = await start_metrics(spawn, nats_url, names)
    for path in ("/api/overview", "/metrics"):
        async with http.get(f"{open_}{path}") as resp:
            assert resp.status == 200


async def test_a_malformed_metrics_key_entry_stops_the_service(
    spawn: Callable[..., ServiceProcess], nats_url: str, names: Names
) -> None:
    proc = spawn("services.metrics", AIMESH_METRICS_PORT="0", AIMESH_METRICS_API_KEYS='["k:infer"]')
    assert await asyncio.to_thread(proc.wait, 30) == 2  # a configuration error
    assert "[metrics] api_keys: entry 1 is not KEY:SCOPE" in proc.output()
