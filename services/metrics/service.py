"""Wiring of the metrics service: it gathers what the mesh publishes, keeps the experiments'
statistics and acts on them, drives the autoscaler, and serves Prometheus and the dashboard.

Inputs (all NATS; nothing is scraped over HTTP):

- metric snapshots of every instance (``<prefix>.metrics.*.*``, core publishes);
- spans (``<prefix>.spans.*``) for the dashboard's recent traces;
- the events stream, replayed from its start by ordered consumers, so a restarted (or a second)
  metrics service rebuilds the same statistics: exposures, feedback, decisions;
- the experiments bucket (splits and their guardrails), followed live;
- the autoscaler's decisions (``<prefix>.scale.*``), the leader's included;
- JetStream consumer info of the request stream (queue lag) and the jobs bucket (training).

Every ``tick_s``: rates into the dashboard's history, each experiment evaluated (a verdict under
``guardrails.auto`` is written to the split with compare-and-set, so of several metrics
instances exactly one acts, and published as an event with its evidence), and, when enabled,
the autoscaler's decision published on ``<prefix>.scale.<pool>`` by the one instance that holds
the pool's lease (``lease.autoscale.<pool>`` in the experiments bucket).  Malformed messages are
counted (``aimesh_rejected_total``) and dropped; they never stop the service.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Self

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.metrics.autoscale import Autoscaler, PoolObservation
from services.metrics.dashboard import add_routes as add_dashboard_routes
from services.metrics.dashboard import key_check
from services.metrics.dashboard import parse_keys as parse_dashboard_keys
from services.metrics.experiments import ExperimentBook
from services.metrics.prometheus import CONTENT_TYPE, MeshView, QueueLag, TrainingFigures, render
from services.metrics.rates import Rates
from services.metrics.timeseries import History
from services.metrics.traces import TraceStore
from shared import events
from shared.actor import ActorConfig, Call
from shared.clock import rfc3339_now
from shared.config import AutoscaleConfig, MeshConfig, MetricsConfig, load_autoscale_config, load_metrics_config
from shared.errors import BadRequest, ConfigError, NotFound
from shared.httpserve import body_deadline, serve_app
from shared.kv import Lease
from shared.names import (
    Header,
    autoscale_lease_key,
    job_key_id,
    job_keys,
    progress_key_id,
    progress_keys,
    split_key,
    split_key_model,
    split_keys,
)
from shared.schemas import (
    ExperimentDecision,
    ExperimentQuery,
    ExperimentReport,
    ExposureBatch,
    MetricsSnapshot,
    ScaleDecision,
    SpanBatch,
    Split,
    TrainJob,
    TrainProgress,
    Variant,
)
from shared.service import Service
from shared.tls import check_http_exposure

log = logging.getLogger(__name__)

_snapshot = msgspec.msgpack.Decoder(MetricsSnapshot)
_spans = msgspec.msgpack.Decoder(SpanBatch)
_exposures = msgspec.msgpack.Decoder(ExposureBatch)
_decision = msgspec.msgpack.Decoder(ExperimentDecision)
_scale = msgspec.msgpack.Decoder(ScaleDecision)
_split = msgspec.json.Decoder(Split)
_job = msgspec.json.Decoder(TrainJob)
_progress = msgspec.json.Decoder(TrainProgress)
MAX_JOBS = 50
SCALE_REPEAT_S = 5.0  # a decision is published on change and at least this often


class MetricsService(Service):
    name = "metrics"
    description = "Gathers metrics and spans, serves Prometheus and the dashboard, judges experiments, autoscales."

    experiments_kv: KeyValue
    jobs_kv: KeyValue
    _started: float  # when setup() ran: the autoscaler's warm-up counts from there

    def __init__(
        self, config: MeshConfig, metrics: MetricsConfig | None = None, autoscale: AutoscaleConfig | None = None
    ) -> None:
        super().__init__(config)
        self.metrics_config = metrics or MetricsConfig()
        self.autoscale_config = autoscale or AutoscaleConfig()
        self.http_url = ""
        self._runner: web.AppRunner | None = None
        # Only the holder of this lease scales the pool, however many metrics instances run (set
        # up with the experiments bucket).
        self.autoscale_lease: Lease | None = None
        self.rates = Rates()
        self.book = ExperimentBook(self.metrics_config.max_exposures)
        self.history = History(self.metrics_config.history_s)
        self.traces = TraceStore()
        self.autoscaler = Autoscaler(self.autoscale_config) if self.autoscale_config.enabled else None
        self.splits: dict[str, tuple[Split, int]] = {}  # model → (split, bucket revision)
        self.reports: dict[str, ExperimentReport] = {}
        self.decisions: deque[ExperimentDecision] = deque(maxlen=200)
        # Decisions written to their split whose event is not stored yet: retried every tick.
        self.pending_decision_events: list[ExperimentDecision] = []
        self.scale: dict[str, ScaleDecision] = {}
        self._scale_sent: dict[str, float] = {}
        self.lags: list[QueueLag] = []
        self.backlog = 0  # durable requests waiting, for the autoscaler
        self.jobs: dict[str, TrainJob] = {}
        self.progress: dict[str, TrainProgress] = {}
        self.rejected: Counter[str] = Counter()
        self._subs: list[Subscription] = []

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> Self:
        return cls(config, load_metrics_config(env), load_autoscale_config(env))

    async def setup(self) -> None:
        await self.ensure_stream(events.stream_config(self.names))
        self.experiments_kv = await self.ensure_kv(self.names.experiments_bucket)
        self.autoscale_lease = Lease(
            self.experiments_kv,
            autoscale_lease_key(self.autoscale_config.pool),
            self.instance_id,
            self.autoscale_config.lease_s,
        )
        self.jobs_kv = await self.ensure_kv(self.names.jobs_bucket)
        self._started = time.monotonic()
        self.add_actor(
            ActorConfig(name="experiments", subject=self.names.experiments_query, max_concurrency=8),
            self.experiment_query,
            ExperimentQuery,
        )
        cfg = self.metrics_config
        try:
            keys = parse_dashboard_keys(cfg.api_keys)
        except ValueError as exc:
            raise ConfigError(f"[metrics] api_keys: {exc}") from None
        check_http_exposure("metrics", cfg.host, has_keys=bool(keys), insecure=cfg.insecure)
        # After the key check, a body within a deadline (408); serve_app bounds the request head.
        checks = [key_check(keys, metrics_open=cfg.metrics_open)] if keys else []
        app = web.Application(middlewares=[*checks, body_deadline()])
        app.router.add_get("/metrics", self._metrics)
        add_dashboard_routes(app, self)
        self._runner, self.http_url = await serve_app(app, self.metrics_config.host, self.metrics_config.port)

    async def after_start(self) -> None:
        nc, js, names = self.nc, self.js, self.names
        self._subs = [
            await nc.subscribe(names.metrics_subjects, cb=self._guard("snapshot", self._on_snapshot)),
            await nc.subscribe(names.spans_subjects, cb=self._guard("spans", self._on_spans)),
            await nc.subscribe(names.scale_subjects, cb=self._guard("scale", self._on_scale)),
        ]
        for subject, handler, kind in (
            (names.exposures("*"), self._on_exposures, "exposures"),
            (names.feedback_subjects, self._on_feedback, "feedback"),
            (names.experiment_events("*"), self._on_decision, "decision"),
        ):
            self._subs.append(
                await js.subscribe(
                    subject, stream=names.events_stream, ordered_consumer=True, cb=self._guard(kind, handler)
                )
            )
        self.watch(self.experiments_kv, split_keys(), self._on_split, name="splits")
        self.watch(self.jobs_kv, job_keys(), self._on_job, name="jobs")
        self.watch(self.jobs_kv, progress_keys(), self._on_job, name="progress")
        self.every(self.metrics_config.tick_s, self.tick, name="tick")
        self.every(self._queue_interval_s(), self.read_queues, name="queues")

    async def stop_intake(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def close_resources(self) -> None:
        # After drain step 2 cancelled the timers: no tick takes the lease back.
        if self.autoscale_lease is not None:
            await self.autoscale_lease.release()  # the next instance takes over at its next tick

    def metadata(self) -> dict[str, str]:
        return {"http": self.http_url} if self.http_url else {}

    # -- inputs ------------------------------------------------------------------------------------
    def _guard(self, kind: str, handle: Callable[[Msg], Awaitable[None] | None]) -> Callable[[Msg], Awaitable[None]]:
        """A subscription callback that counts and drops what it cannot use, and never raises."""

        async def callback(msg: Msg) -> None:
            try:
                result = handle(msg)
                if result is not None:
                    await result
            except (msgspec.DecodeError, msgspec.ValidationError, BadRequest) as exc:
                self.rejected[kind] += 1
                log.debug("rejected a %s message on %s: %s", kind, msg.subject, exc)
            except Exception:
                self.rejected[kind] += 1
                log.exception("failed to handle a %s message on %s", kind, msg.subject)

        return callback

    def _on_snapshot(self, msg: Msg) -> None:
        self.rates.add(_snapshot.decode(msg.data))

    def _on_spans(self, msg: Msg) -> None:
        self.traces.add(_spans.decode(msg.data))

    def _on_scale(self, msg: Msg) -> None:
        """The leader's decisions, so that every instance shows the pool's current target."""
        decision = _scale.decode(msg.data)
        if decision.by != self.instance_id:
            self.scale[decision.pool] = decision

    def _on_exposures(self, msg: Msg) -> None:
        self.book.on_exposures(_exposures.decode(msg.data))

    def _on_feedback(self, msg: Msg) -> None:
        self.book.on_feedback(events.decode_feedback(msg.data, msg.subject.rsplit(".", 1)[-1]))

    def _on_decision(self, msg: Msg) -> None:
        decision = _decision.decode(msg.data)
        # One per experiment: a retried publish after the stream's duplicate window is stored twice.
        if not any((d.model, d.experiment) == (decision.model, decision.experiment) for d in self.decisions):
            self.decisions.append(decision)

    def _on_split(self, entry: KeyValue.Entry) -> None:
        model = split_key_model(entry.key)
        if model is None:
            return
        if not entry.value:
            self.splits.pop(model, None)
            self.reports.pop(model, None)
            return
        try:
            self.splits[model] = (_split.decode(entry.value), entry.revision or 0)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.rejected["split"] += 1

    def _on_job(self, entry: KeyValue.Entry) -> None:
        if not entry.value:
            return
        job, progress = job_key_id(entry.key), progress_key_id(entry.key)
        try:
            if job is not None:
                self.jobs[job] = _job.decode(entry.value)
            elif progress is not None:
                self.progress[progress] = _progress.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.rejected["training"] += 1
        for stale in list(self.progress)[:-MAX_JOBS]:
            self.progress.pop(stale, None)
            self.jobs.pop(stale, None)

    def _queue_interval_s(self) -> float:
        """Queue lag is read every scrape interval, or every tick when the autoscaler needs it fresh."""
        cfg = self.metrics_config
        return min(cfg.scrape_interval_s, cfg.tick_s) if self.autoscaler is not None else cfg.scrape_interval_s

    async def read_queues(self) -> None:
        """Queue lag of every durable consumer of the request stream (what KEDA's nats-jetstream
        scaler reads): pending + ack pending; and the messages waiting in the stream."""
        stream = self.names.requests_stream
        try:
            consumers = await self.js.consumers_info(stream)
            info = await self.js.stream_info(stream)
        except Exception:  # no stream yet (nothing deployed) or NATS away: keep the last figures
            log.debug("queue lag not read", exc_info=True)
            return
        self.lags = [
            QueueLag(stream, c.name or "", int(c.num_pending or 0), int(c.num_ack_pending or 0)) for c in consumers
        ]
        lag = sum(q.pending + q.ack_pending for q in self.lags)
        self.backlog = max(lag, int(info.state.messages or 0))

    # -- every tick --------------------------------------------------------------------------------
    async def tick(self) -> None:
        now = time.time()
        for key, window in self.rates.variants(now).items():
            self.history.add(now, "rps", key, window.rate)
            self.history.add(now, "error_rate", key, window.error_rate)
            p99 = window.quantile_ms(0.99)
            if p99 is not None:
                self.history.add(now, "p99_ms", key, p99)
        pool = self.autoscale_config.pool
        load = self.rates.pool(now, pool)
        self.history.add(now, "replicas", pool, load.replicas)
        self.history.add(now, "lag", pool, self.backlog)
        await self._publish_decisions()
        for model, (split, revision) in list(self.splits.items()):
            report = self.book.evaluate(split, now)
            self.reports[model] = report
            acts = split.state == "running" and split.guardrails is not None and split.guardrails.auto
            if acts and report.verdict in ("promote", "rollback"):
                await self._decide(split, revision, report, now)
        warm = time.monotonic() - self._started >= self.autoscale_config.warmup_s
        if self.autoscaler is not None and warm and await self._leads_autoscaling():
            decision = self.autoscaler.decide(
                now,
                PoolObservation(
                    replicas=load.replicas,
                    in_flight=load.in_flight,
                    lag=self.backlog,
                    requests_total=load.requests_total,
                    p99_ms=load.p99_ms,
                ),
            )
            await self._publish_scale(msgspec.structs.replace(decision, by=self.instance_id), now)

    async def _leads_autoscaling(self) -> bool:
        """Renew or take the pool's lease.  A new holder starts a fresh policy, which adopts the
        pool as it finds it, rather than the state of whenever it last led."""
        lease = self.autoscale_lease
        assert lease is not None  # made by setup(), before any tick
        was = lease.held
        held = await lease.hold()
        if held and not was:
            log.info("holds the autoscaling lease of pool %s", self.autoscale_config.pool)
            self.autoscaler = Autoscaler(self.autoscale_config)
        elif was and not held:
            log.warning("lost the autoscaling lease of pool %s to another instance", self.autoscale_config.pool)
        return held

    async def _decide(self, split: Split, revision: int, report: ExperimentReport, now: float) -> None:
        """Promote the winner or roll back to the control: compare-and-set on the split, so the
        decision is made once, and an event with the evidence."""
        action = report.verdict
        if action != "promote" and action != "rollback":
            return  # only these verdicts act (the caller checks it too)
        version = report.winner or (split.control_version if action == "rollback" else "")
        if not version:
            return
        candidate = report.winner if action == "promote" else _rolled_back_candidate(report)
        decided = msgspec.structs.replace(
            split,
            variants=[Variant(version=version, weight=100.0)],
            mirrors=[],
            state="promoted" if action == "promote" else "rolled_back",
            decided_at=rfc3339_now(),
        )
        try:
            new_revision = await self.experiments_kv.update(
                split_key(split.model), msgspec.json.encode(decided), last=revision
            )
        except KeyWrongLastSequenceError:
            return  # another metrics instance (or a user) changed the split first
        self.splits[split.model] = (decided, new_revision)
        event = ExperimentDecision(
            model=split.model,
            experiment=split.experiment,
            action=action,
            version=version,
            candidate=candidate,
            reason=report.reason,
            evidence=report,
            ts=now,
        )
        log.info("experiment %s/%s: %s → %s (%s)", split.model, split.experiment, action, version, report.reason)
        self.pending_decision_events.append(event)
        await self._publish_decisions()

    async def _publish_decisions(self) -> None:
        """Store the events of decisions already written to their split.  One that fails (NATS
        away, the stream full) stays queued for the next tick; the ``Nats-Msg-Id`` makes a retry
        of one that was stored after all a duplicate the stream drops."""
        while self.pending_decision_events:
            event = self.pending_decision_events[0]
            try:
                await self.js.publish(
                    self.names.experiment_events(event.model),
                    msgspec.msgpack.encode(event),
                    headers={Header.MSG_ID: f"decision:{event.model}:{event.experiment}"},
                )
            except Exception as exc:
                log.warning(
                    "decision event %s/%s not stored (%s): tried again next tick", event.model, event.experiment, exc
                )
                return
            self.pending_decision_events.pop(0)

    async def _publish_scale(self, decision: ScaleDecision, now: float) -> None:
        before = self.scale.get(decision.pool)
        self.scale[decision.pool] = decision
        changed = before is None or before.desired != decision.desired
        if changed or now - self._scale_sent.get(decision.pool, 0.0) >= SCALE_REPEAT_S:
            await self.nc.publish(self.names.scale(decision.pool), msgspec.msgpack.encode(decision))
            self._scale_sent[decision.pool] = now
            if changed:
                log.info("scale %s: %d → %d (%s)", decision.pool, decision.current, decision.desired, decision.reason)

    # -- outputs -----------------------------------------------------------------------------------
    async def experiment_query(self, req: ExperimentQuery, _: Call) -> ExperimentReport:
        report = self.experiment_report(req.model)
        if report is None:
            raise NotFound(f"model {req.model!r} has no split (aimesh split {req.model} 1=50 2=50 ...)")
        return report

    def experiment_report(self, model: str) -> ExperimentReport | None:
        found = self.splits.get(model)
        if found is None:
            return self.reports.get(model)
        report = self.book.evaluate(found[0], time.time())
        self.reports[model] = report
        return report

    def experiment_reports(self) -> list[ExperimentReport]:
        return [self.reports[m] for m in sorted(self.reports)]

    def scale_decisions(self) -> dict[str, ScaleDecision]:
        return dict(self.scale)

    def view(self) -> MeshView:
        now = time.time()
        training = []
        for job_id, progress in self.progress.items():
            job = self.jobs.get(job_id)
            training.append(
                TrainingFigures(
                    job=job_id,
                    model=job.request.model if job else "",
                    loss=progress.loss,
                    samples_per_s=progress.samples_per_s,
                    step=progress.step,
                )
            )
        pool = self.autoscale_config.pool
        return MeshView(
            snapshots=self.rates.live(now),
            lags=self.lags,
            training=training,
            experiments=self.experiment_reports(),
            replicas={pool: self.rates.pool(now, pool).replicas},
            scale=self.scale,
            rejected=dict(self.rejected),
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=render(self.view()).encode(), headers={"Content-Type": CONTENT_TYPE})


def _rolled_back_candidate(report: ExperimentReport) -> str:
    flagged = [v.version for v in report.variants if v.guardrail]
    if flagged:
        return flagged[0]
    worse = [v for v in report.variants if v.version != report.control]
    return min(worse, key=lambda v: v.lift).version if worse else ""
