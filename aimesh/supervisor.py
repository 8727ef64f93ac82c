"""``aimesh up``: an embedded nats-server and one OS process per service instance, supervised.

- The nats-server (JetStream on, store under ``<data_dir>/nats``, messages up to
  ``nats_max_payload``) starts first, unless a NATS URL was given.  If it dies it is restarted
  on the same port with the same store: services reconnect on their own.
- Each service instance is ``python -m services.<name>`` in its own session (so a terminal's
  Ctrl-C reaches only the supervisor, which orders the shutdown) and dies with the supervisor
  (``PR_SET_PDEATHSIG``), so a killed supervisor leaves no orphans.
- A crashed instance is restarted after a back-off that doubles per recent crash; a crash
  loop (``crash_loop_restarts`` crashes within ``crash_loop_window_s``) is logged at CRITICAL
  on every further crash and shown in the state file, never hidden.
- Scale decisions (``ScaleDecision`` on ``<prefix>.scale.<service>``, from the metrics
  service's autoscaler) are followed only when autoscaling is on, only for its pool and only
  within its ``[min_replicas, max_replicas]`` (the router and metrics never to zero); on a mesh
  with identities only the metrics identity may publish them.  They are carried out with
  ``scale()``: new instances start, surplus ones get SIGTERM and drain.  A message that does not
  decode or asks for what is not allowed is logged and counted, never fatal.
- Shutdown (SIGTERM or Ctrl-C): scale decisions stop being followed (the supervisor's NATS
  connection closes while the server is still up), every instance gets SIGTERM and drains (up
  to the services' drain timeout plus a margin), stragglers are killed, then the server stops.
  Exit code 0 when everything stopped in order, 1 when something had to be killed.

``<data_dir>/mesh.json`` records the NATS URL, so ``aimesh status`` finds the running mesh, and
the instances each service is meant to have now.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aimesh.restart import RestartPolicy
from services import SERVICE_NAMES
from shared import auth, cluster
from shared.config import AutoscaleConfig, UpConfig, config_path, load_mesh_config, read_toml
from shared.connect import connect
from shared.names import Names
from shared.natsserver import NatsServer, die_with_parent, limits_config
from shared.schemas import ScaleDecision
from shared.tls import LocalPki, check_exposure, ensure_local_pki, is_loopback

log = logging.getLogger("aimesh.up")

STATE_FILE = "mesh.json"
MAX_REPLICAS = 64  # per service: a decision above this is refused (a bug or a bad message, not load)
NEVER_TO_ZERO = ("router", "metrics")  # the gateway and the autoscaler itself


@dataclass
class Slot:
    """One supervised service instance (restarted in place when it crashes)."""

    service: str
    index: int
    policy: RestartPolicy
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    crash_loop: bool = False
    retired: bool = False
    last_exit: int | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.service}#{self.index}"


class Supervisor:
    def __init__(
        self,
        up: UpConfig,
        *,
        nats_url: str | None,
        child_env: dict[str, str],
        drain_timeout_s: float,
        credentials_dir: Path | None = None,
        autoscale: AutoscaleConfig | None = None,
    ) -> None:
        self.up = up
        self.autoscale = autoscale if autoscale is not None and autoscale.enabled else None
        self.nats_url = nats_url
        self.data_dir = Path(up.data_dir)
        # One nkey seed per role: generated here for the embedded server (unless auth is off),
        # given for an external NATS (`aimesh auth init` writes them), else none.
        if credentials_dir is None and nats_url is None and up.auth:
            credentials_dir = self.data_dir / "auth"
        elif credentials_dir is not None:
            for role in (*SERVICE_NAMES, "supervisor"):  # given ones must all be there, and private
                auth.read_seed(auth.seed_path(credentials_dir, role))
        self.credentials_dir = credentials_dir.resolve() if credentials_dir is not None else None
        self.pki: LocalPki | None = None
        # What a laptop user ingests: files under where they started the mesh, and its data dir,
        # unless the roots are configured.  Decided once, not at every spawn.
        configured = "AIMESH_INGEST_ROOTS" in os.environ | child_env or "roots" in read_toml(config_path()).get(
            "ingest", {}
        )
        self._ingest_roots = None if configured else json.dumps([os.getcwd(), str(self.data_dir.resolve())])
        if up.tls:
            extra = () if is_loopback(up.host) or up.host in ("0.0.0.0", "::") else (up.host,)
            self.pki = ensure_local_pki((self.data_dir / "tls").resolve(), extra)
        self.child_env = child_env
        self.drain_timeout_s = drain_timeout_s
        self.server: NatsServer | None = None
        self.slots: list[Slot] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self.started = asyncio.Event()  # set once the server is up and the services launched
        self.following = asyncio.Event()  # set once subscribed to scale decisions
        self.bad_decisions = 0  # scale messages that did not decode or asked for the impossible
        self._server_task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None
        self._decoder = msgspec.msgpack.Decoder(ScaleDecision)

    # -- running ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        self._stop = stop
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.nats_url is None:
            self.server = NatsServer(
                store_dir=self.data_dir / "nats",
                host=self.up.host,
                port=self.up.port,
                http_port=self.up.http_port,
                log_file=self.data_dir / "nats-server.log",
                die_with_parent=True,
                extra_args=self._server_config_args(),
            )
            # Started from the loop's (main) thread: die_with_parent ties it to this thread.
            self.server.start()
            self.nats_url = self.server.url
            log.info(
                "nats-server on %s (monitoring %s, store %s, max_payload %d bytes%s)",
                self.server.url,
                self.server.monitor_url,
                self.server.store_dir,
                self.up.nats_max_payload,
                f"; cluster {self.up.cluster}, routes on port {self.up.cluster_port}" if self.up.cluster else "",
            )
            self._server_task = asyncio.create_task(self._watch_server())
        else:
            log.info("using NATS at %s (no embedded server)", self.nats_url)
        external = self.nats_url if self.server is None else None
        self.child_env |= cluster.replicas_env(self.up, external, self.child_env, _mesh_table())
        if "AIMESH_JS_REPLICAS" in self.child_env:
            log.info("JetStream replicas for the mesh's streams and buckets: %s", self.child_env["AIMESH_JS_REPLICAS"])
        self._write_state()  # at once, so `aimesh status` finds the mesh while services start
        for service in SERVICE_NAMES:
            self.scale(service, getattr(self.up, service))
        self._write_state()
        if self.autoscale is not None:
            self._follow_task = asyncio.create_task(self._follow_decisions(), name="scale-decisions")
        else:
            log.info("autoscaling off: scale decisions are not followed")
        self.started.set()
        await stop.wait()
        return await self.shutdown()

    def _server_config_args(self) -> list[str]:
        """The embedded server's config file: its message size limit, every role's identity and
        permissions, the cluster (routes, their secret and TLS), and TLS."""
        check_exposure(
            "the embedded nats-server",
            self.up.host,
            protected=self.credentials_dir is not None and self.pki is not None,
            needs="authentication and TLS (the default identities, and --tls)",
            override=self.up.insecure,
            setting="[up] insecure (AIMESH_UP_INSECURE)",
        )
        # Bodies the router takes (16 MiB by default) must fit a message: NATS's own 1 MiB does not.
        parts = [limits_config(self.up.nats_max_payload)]
        if self.credentials_dir is not None:
            prefix = self.child_env.get("AIMESH_PREFIX", "aimesh")
            parts.append(auth.server_config(Names(prefix), auth.ensure_seeds(self.credentials_dir)))
        if self.up.cluster is not None:
            secret = cluster.route_secret(self.credentials_dir) if self.credentials_dir is not None else None
            tls = cluster.route_tls(self.up, self.credentials_dir, self.data_dir.resolve())
            parts.append(cluster.cluster_config(self.up, secret, tls))
        if self.pki is not None:
            block = {"cert_file": str(self.pki.cert), "key_file": str(self.pki.key), "timeout": 5}
            parts.append(f"tls: {json.dumps(block)}\n")
        config = self.data_dir / "nats-server.conf"
        auth.write_private(config, "".join(parts).encode())
        return ["-c", str(config)]

    def seed(self, role: str) -> str | None:
        """The seed file of ``role``'s identity, when the mesh has identities."""
        return str(auth.seed_path(self.credentials_dir, role)) if self.credentials_dir is not None else None

    def role_env(self, role: str) -> dict[str, str]:
        """What a process of ``role`` is given to join the mesh: its identity, the CA to trust
        and, for the router, the certificate to serve HTTPS with."""
        seed = self.seed(role)
        env = {"AIMESH_NATS_NKEY": seed} if seed else {}
        if role == "ingest" and self._ingest_roots is not None:
            env["AIMESH_INGEST_ROOTS"] = self._ingest_roots
        if self.pki is not None:
            env["AIMESH_NATS_TLS_CA"] = str(self.pki.ca)
            if role == "router":
                env |= {"AIMESH_ROUTER_TLS_CERT": str(self.pki.cert), "AIMESH_ROUTER_TLS_KEY": str(self.pki.key)}
        return env

    def replicas(self, service: str) -> int:
        """Instances ``service`` is meant to have now (draining ones not counted)."""
        return sum(1 for s in self.slots if s.service == service and not s.retired)

    def scale(self, service: str, replicas: int) -> None:
        """Run ``replicas`` instances of ``service`` (the autoscaler calls this too)."""
        live = [s for s in self.slots if s.service == service and not s.retired]
        for index in range(len(live), replicas):
            slot = Slot(
                service,
                index,
                RestartPolicy(
                    self.up.restart_backoff_s,
                    self.up.restart_backoff_max_s,
                    self.up.crash_loop_restarts,
                    self.up.crash_loop_window_s,
                ),
            )
            self.slots.append(slot)
            slot.task = asyncio.create_task(self._keep_running(slot), name=f"slot-{slot.label}")
        for slot in live[replicas:]:
            slot.retired = True  # its drain ends its task's loop
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGTERM)

    async def _keep_running(self, slot: Slot) -> None:
        while not self._stopping and not slot.retired:
            slot.starts += 1
            slot.proc = await self._spawn(slot)
            if slot.retired and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGTERM)  # scaled down while it was being started
            code = await slot.proc.wait()
            slot.last_exit = code
            if self._stopping:
                return
            if slot.retired:
                log.log(logging.INFO if code == 0 else logging.WARNING, "%s stopped (code %s)", slot.label, code)
                return
            delay, looping = slot.policy.on_crash(time.monotonic())
            slot.crash_loop = looping
            self._write_state()
            if looping:
                log.critical(
                    "CRASH LOOP: %s exited with code %s, %d times in %gs; restarting in %.1fs. Check its log above.",
                    slot.label,
                    code,
                    len(slot.policy.crashes),
                    slot.policy.loop_window_s,
                    delay,
                )
            else:
                log.error("%s exited with code %s; restarting in %.1fs", slot.label, code, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except TimeoutError:
                pass

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        env = os.environ | self.child_env | {"AIMESH_NATS_URL": self.nats_url or ""} | self.role_env(slot.service)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{slot.service}",
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info("started %s (pid %d)", slot.label, proc.pid)
        return proc

    # -- scale decisions ----------------------------------------------------------------------
    async def _follow_decisions(self) -> None:
        """Connect (retrying until NATS answers; reconnecting forever after) and subscribe to the
        scale decisions.  Runs after the services were launched, so a slow NATS delays nothing."""
        env = os.environ | self.child_env | {"AIMESH_NATS_URL": self.nats_url or ""} | self.role_env("supervisor")
        try:
            config = load_mesh_config(env=env)
            self._nc = await connect(
                config,
                f"{config.prefix}-supervisor",
                role="supervisor",
                error_cb=self._on_nats_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            subject = Names(config.prefix).scale_subjects
            await self._nc.subscribe(subject, cb=self._on_decision)
            await self._nc.flush()
        except Exception:
            log.exception("cannot follow scale decisions; the service counts stay as they are")
            return
        log.info("following scale decisions on %s", subject)
        self.following.set()

    async def _on_decision(self, msg: Msg) -> None:
        try:
            decision = self._decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self.bad_decisions += 1
            log.warning(
                "undecodable scale decision on %s skipped (%s); %d so far", msg.subject, exc, self.bad_decisions
            )
            return
        self.apply(decision)

    def apply(self, decision: ScaleDecision) -> None:
        """Carry out one decision: the count it asks for, if it names a service and is possible."""
        if self._stopping:
            return
        if decision.pool not in SERVICE_NAMES:
            self.bad_decisions += 1
            log.warning("scale decision for %r skipped: not a service (%s)", decision.pool, ", ".join(SERVICE_NAMES))
            return
        policy = self.autoscale
        if policy is None or decision.pool != policy.pool:
            self.bad_decisions += 1
            log.warning("scale decision for %s skipped: that pool is not autoscaled here", decision.pool)
            return
        low = max(policy.min_replicas, 1 if decision.pool in NEVER_TO_ZERO else 0)
        high = min(policy.max_replicas, MAX_REPLICAS)
        if not low <= decision.desired <= high:
            self.bad_decisions += 1
            log.warning(
                "scale decision for %s skipped: %d instances asked, between %d and %d allowed",
                decision.pool,
                decision.desired,
                low,
                high,
            )
            return
        before = self.replicas(decision.pool)
        if decision.desired == before:
            return  # decisions are repeated; only changes are news
        log.info("scale %s: %d → %d (%s)", decision.pool, before, decision.desired, decision.reason)
        self.scale(decision.pool, decision.desired)
        self._write_state()

    async def _on_nats_error(self, exc: Exception) -> None:
        log.debug("NATS: %s", exc or type(exc).__name__)  # the server's own fate is logged by its watcher

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            log.warning("disconnected from NATS; scale decisions wait until it is back")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS; following scale decisions again")

    async def _stop_following(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _watch_server(self) -> None:
        server = self.server
        assert server is not None and server.process is not None
        policy = RestartPolicy(self.up.restart_backoff_s, self.up.restart_backoff_max_s)
        while not self._stopping:
            code = await asyncio.to_thread(server.process.wait)
            if self._stopping:
                return
            delay, _ = policy.on_crash(time.monotonic())
            log.critical("nats-server exited with code %s; restarting it in %.1fs on the same port", code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            server.start()  # the main thread again, for die_with_parent

    # -- stopping -----------------------------------------------------------------------------
    async def shutdown(self) -> int:
        self._stopping = True
        await self._stop_following()  # no scaling while stopping; the server is still up to close to
        clean = True
        live = [s for s in self.slots if s.proc is not None and s.proc.returncode is None]
        log.info("stopping %d service processes (drain up to %gs)", len(live), self.drain_timeout_s)
        for slot in live:
            assert slot.proc is not None
            slot.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(s.proc.wait()) for s in live if s.proc is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.drain_timeout_s + 5)
            if pending:
                clean = False
        for slot in live:
            assert slot.proc is not None
            if slot.proc.returncode is None:
                log.error("%s did not stop in time; killing it", slot.label)
                slot.proc.kill()
                await slot.proc.wait()
            elif slot.proc.returncode != 0:
                clean = False
                log.error("%s exited with code %s while draining", slot.label, slot.proc.returncode)
        tasks = [s.task for s in self.slots if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            code = await asyncio.to_thread(self.server.stop)
            log.info("nats-server stopped (code %s)", code)
            if self._server_task is not None:
                await asyncio.gather(self._server_task, return_exceptions=True)
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        log.info("mesh stopped%s", "" if clean else " (some processes did not stop cleanly)")
        return 0 if clean else 1

    def _write_state(self) -> None:
        state = {
            "nats_url": self.nats_url,
            "monitor_url": self.server.monitor_url if self.server else None,
            "supervisor_pid": os.getpid(),
            "prefix": self.child_env.get("AIMESH_PREFIX", "aimesh"),
            # Where the CLI finds the operator identity (the seed files are 0600 in a 0700 dir).
            "credentials": str(self.credentials_dir) if self.credentials_dir else None,
            "tls_ca": str(self.pki.ca) if self.pki else None,
            "crash_loops": [s.label for s in self.slots if s.crash_loop],
            "replicas": {service: self.replicas(service) for service in SERVICE_NAMES},
        }
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)


def _mesh_table() -> dict[str, object]:
    table = read_toml(config_path()).get("mesh", {})
    return table if isinstance(table, dict) else {}


def read_state(data_dir: str | Path) -> dict[str, object] | None:
    path = Path(data_dir) / STATE_FILE
    try:
        data: dict[str, object] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return None
