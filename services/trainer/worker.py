"""One rank of one training attempt: a child process of a trainer agent.

``python -m services.trainer.worker --job J --attempt A --rank R --world W --master HOST:PORT``

It refuses a model factory outside the trusted packages (``model_packages``) before importing
anything, joins the torch.distributed group (rank 0 serves the TCPStore on the job's address
only; gloo on CPU, NCCL on CUDA; collectives time out after the job's ``collective_timeout_s``,
not torch's 30 minutes), reads its shards through the dataset reader, resumes from the job's last
checkpoint if there is one, trains (DDP for ``dp``, ``torch.distributed.pipelining`` GPipe for
``pp``), checkpoints, and at the end rank 0 evaluates on the held-out records, uploads the
weights and registers the model version.

Exit code 0 means this rank finished its part; anything else (a crash, a lost peer surfacing as a
collective error or timeout, SIGKILL) tells the agent that the attempt failed.

Rank 0 keeps an account of the attempt in ``attempt.<job>.<attempt>`` (``AttemptRecord``): where
its training started (the checkpoint it resumed from, or none) and, when training ends, a digest
of every rank's parameters (data parallel: all equal, or the gradient sync is broken).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import os
import sys
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, NoReturn

import msgspec
import numpy as np
import torch
import torch.distributed as dist
from nats.js.errors import KeyNotFoundError, NotFoundError

from services.trainer import data
from services.trainer.bridge import NatsBridge
from services.trainer.store import collective_env, create_store
from shared.clock import rfc3339_now
from shared.config import MeshConfig, TrainerConfig, load_mesh_config, load_trainer_config
from shared.datasets import DatasetReader
from shared.errors import BadRequest
from shared.logs import setup_logging
from shared.names import Names, attempt_key, checkpoint_key, job_key, progress_key, result_key
from shared.registry import artifacts, put_object, register
from shared.schemas import (
    Checkpoint,
    DatasetManifest,
    ModelTask,
    ModelVersion,
    TrainJob,
    TrainProgress,
    TrainRequest,
    TrainResult,
)
from zoo import ModelSpec, build_model, check_factory, check_kwargs
from zoo.artifacts import checkpoint_from_bytes, checkpoint_to_bytes, weights_to_bytes
from zoo.lm import declared_chat_template, lm_loss

log = logging.getLogger("aimesh.trainer.worker")
_json = msgspec.json.Encoder()
PROGRESS_EVERY_S = 0.5
LOSSES_KEPT = 2000


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Rank 0's account of one attempt (key ``attempt.<job>.<attempt>`` in the jobs bucket), written
    when its training starts and again when it ends.  Steps count within an epoch."""

    job_id: str
    attempt: int
    world: int
    steps_per_epoch: int
    start_epoch: int  # where this attempt's training started
    start_step: int
    checkpoint: str = ""  # the object it resumed from; "" when none was recorded (from the start)
    checkpoint_attempt: int = 0  # the attempt that wrote it, and its position and world size
    checkpoint_epoch: int = 0
    checkpoint_step: int = 0
    checkpoint_steps_per_epoch: int = 0
    checkpoint_world: int = 0
    steps_trained: int = 0  # by this attempt (at the end)
    weights: list[str] = []  # sha256 of each rank's parameters at the end of training, by rank (dp)


class Worker:
    def __init__(self, args: argparse.Namespace, config: MeshConfig, trainer: TrainerConfig) -> None:
        self.job_id: str = args.job
        self.attempt: int = args.attempt
        self.rank: int = args.rank
        self.world: int = args.world
        self.master: str = args.master
        self.config = config
        self.packages = self.config.model_packages  # the agent passes its own (AIMESH_MODEL_PACKAGES)
        self.host = trainer.host
        self.names = Names(self.config.prefix)
        self.bridge = NatsBridge(self.config, f"{self.config.prefix}-trainer-{self.job_id}-r{self.rank}")
        self.js = self.bridge.nc.jetstream()
        self.jobs = self.bridge.call(self.js.key_value(self.names.jobs_bucket))
        job = msgspec.json.decode(self.bridge.call(self.jobs.get(job_key(self.job_id))).value or b"", type=TrainJob)
        self.job = job
        self.req: TrainRequest = job.request
        self.device = self._device()
        self.losses: list[float] = []
        self._pending_checkpoint: Future[None] | None = None
        self._record: AttemptRecord | None = None  # rank 0's account of this attempt
        self.steps_trained = 0
        self._last_checkpoint = time.monotonic()

    def _device(self) -> torch.device:
        want = self.req.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise SystemExit("device cuda asked for, but CUDA is not available on this node")
            return torch.device("cuda", self.rank % torch.cuda.device_count())
        return torch.device("cpu")

    # -- the whole attempt -------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._check_model()
            self._run()
        finally:
            self.bridge.close()

    def _run(self) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.req.collective_timeout_s)
        # The store is made here, not by init_method="tcp://…": torch's own would listen on every
        # interface; create_store (store.py) binds rank 0's to the job's address only.
        os.environ.update(collective_env(self.host, os.environ))
        store = create_store(self.master, self.rank, self.world, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        try:
            manifest = self.bridge.call(DatasetReader.open(self.js, self.names, self.req.dataset)).manifest
            task: ModelTask = "lm" if any(c.name == "tokens" for c in manifest.columns) else "classify"
            if self.req.parallel == "pp" and task != "lm":
                raise SystemExit("pipeline parallelism (pp) is for the language model: use dp for classifiers")
            arrays, sizes = self._load(manifest)
            train, _ = data.split(arrays, sizes, self.req.eval_fraction)
            steps = data.steps_per_epoch(
                manifest, self.world, self.req.parallel, self.req.batch_size, self.req.eval_fraction
            )
            if steps == 0:
                raise SystemExit(f"batch size {self.req.batch_size} is larger than a rank's share of the data")
            if self.req.parallel == "pp":
                if self.req.batch_size % self.req.microbatches:
                    raise SystemExit(
                        f"batch size {self.req.batch_size} must divide into {self.req.microbatches} micro-batches"
                    )
                model, full = self._pp_model()
            else:
                model, full = self._dp_model()
            self._train(model, full, train, steps, task, manifest)
            self.wait_checkpoint()
            self._account_end(full)
            if self.rank == 0 or self.req.parallel == "pp":
                self._finish(full, manifest, task)
        finally:
            dist.destroy_process_group()

    def _load(self, manifest: DatasetManifest) -> tuple[dict[str, np.ndarray], list[int]]:
        shards = data.train_shards(manifest, self.rank, self.world, self.req.parallel)
        reader = DatasetReader(self.js, self.names, manifest)
        arrays = self.bridge.call(reader.load(shards))
        return arrays, [manifest.shards[s].records for s in shards]

    # -- models ------------------------------------------------------------------------------
    def _spec(self) -> ModelSpec:
        return ModelSpec(factory=self.req.factory, kwargs=self.req.kwargs)

    def _check_model(self) -> None:
        """Refuse a factory outside the trusted packages, or kwargs that are not plain data, before
        anything is imported: the job record may not have come through ``submit``'s checks.  The
        refusal fails the job (a retry could not fix it)."""
        try:
            check_factory(self.req.factory, self.packages)
            check_kwargs(self.req.kwargs)
        except BadRequest as exc:
            self._fail(exc.description)

    def _dp_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        torch.manual_seed(self.req.seed)
        full = build_model(self._spec(), self.packages).to(self.device)
        if self.world == 1:
            return full, full
        ddp = torch.nn.parallel.DistributedDataParallel(
            full, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        return ddp, full

    def _pp_model(self) -> tuple[Any, torch.nn.Module]:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        torch.manual_seed(self.req.seed)
        full = build_model(self._spec(), self.packages)
        if not hasattr(full, "stages"):
            raise SystemExit(f"{self.req.factory} has no stages(n): it cannot be pipelined")
        piece = full.stages(self.world)[self.rank].to(self.device)  # type: ignore[operator]
        stage = PipelineStage(piece, self.rank, self.world, self.device)  # shapes are inferred at the first step
        # Every stage gets the loss function: the schedule decides from it that there is a backward pass,
        # and all stages must agree on that or the first step hangs.
        schedule = ScheduleGPipe(stage, n_microbatches=self.req.microbatches, loss_fn=lm_loss)
        self._pp_piece = piece
        return schedule, full

    def _parameters(self, model: Any) -> Any:
        return self._pp_piece.parameters() if self.req.parallel == "pp" else model.parameters()

    # -- training ----------------------------------------------------------------------------
    def _train(
        self,
        model: Any,
        full: torch.nn.Module,
        train: dict[str, np.ndarray],
        steps: int,
        task: str,
        manifest: DatasetManifest,
    ) -> None:
        req = self.req
        params = list(self._parameters(model))
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=req.lr, momentum=0.9)
            if req.optimizer == "sgd"
            else torch.optim.Adam(params, lr=req.lr)
        )
        start_epoch, start_step = self._resume(full, opt, steps)
        per_rank = req.batch_size if req.parallel == "pp" else req.batch_size // self.world
        shuffle_seed = data.shuffle_seed(req.seed, self.rank, req.parallel)
        total_steps = self.steps_trained = 0
        self.train_seconds = 0.0
        self.train_samples = 0
        loop_start = time.perf_counter()
        last_report = 0.0
        window_start, window_samples = time.perf_counter(), 0
        for epoch in range(start_epoch, req.epochs):
            first = start_step if epoch == start_epoch else 0
            batches = data.rank_batches(train, per_rank, shuffle_seed, epoch, first * per_rank)
            for step in range(first, steps):
                batch = next(batches)
                loss = self._step(model, opt, batch, task)
                total_steps = self.steps_trained = total_steps + 1
                self.train_samples += req.batch_size
                window_samples += req.batch_size
                done = epoch * steps + step + 1
                if self.rank == 0 and len(self.losses) < LOSSES_KEPT:
                    self.losses.append(loss)
                if math.isnan(loss) or math.isinf(loss):
                    self._fail(f"loss became {loss} at epoch {epoch} step {step}: lower --lr or check the data")
                now = time.perf_counter()
                if self._reporter() and now - last_report >= PROGRESS_EVERY_S:
                    rate = window_samples / max(now - window_start, 1e-9)
                    self._progress(epoch, step + 1, steps, loss, rate)
                    last_report, window_start, window_samples = now, now, 0
                at_end = step + 1 == steps
                epoch_checkpoint = at_end and (
                    epoch + 1 == req.epochs or time.monotonic() - self._last_checkpoint >= req.checkpoint_interval_s
                )
                if (req.checkpoint_every and done % req.checkpoint_every == 0) or epoch_checkpoint:
                    next_epoch, next_step = (epoch + 1, 0) if at_end else (epoch, step + 1)
                    self._checkpoint(full, opt, next_epoch, next_step, steps)
                if req.max_steps is not None and total_steps >= req.max_steps:
                    self.train_seconds = time.perf_counter() - loop_start
                    return
        self.train_seconds = time.perf_counter() - loop_start

    def _step(self, model: Any, opt: torch.optim.Optimizer, batch: dict[str, np.ndarray], task: str) -> float:
        opt.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        if task == "lm":
            tokens = torch.from_numpy(batch["tokens"].astype(np.int64)).to(self.device)
            x, y = tokens[:, :-1], tokens[:, 1:]
        else:
            x = torch.from_numpy(batch["x"]).to(self.device)
            y = torch.from_numpy(batch["y"]).to(self.device)
        if self.req.parallel == "pp":
            return self._pp_step(model, opt, x, y)
        with autocast:
            out = model(x)
            loss = lm_loss(out, y) if task == "lm" else torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        value = loss.detach()
        if self.world > 1:  # report the global mean loss
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world
        return float(value)

    def _pp_step(self, schedule: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        last = self.rank == self.world - 1
        losses: list[torch.Tensor] = []
        if self.rank == 0:
            schedule.step(x)
        elif last:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        opt.step()
        value = torch.stack(losses).mean().detach() if last else torch.zeros(())
        dist.broadcast(value, src=self.world - 1)  # every rank knows the loss (NaN checks, reports)
        return float(value)

    def _reporter(self) -> bool:
        return self.rank == 0

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, full: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, steps: int) -> None:
        """Snapshot the state now; upload it in the background (data parallel) while training goes on.

        Only one upload is in flight: a new checkpoint first waits for the previous one.  The
        checkpoint key is written after its object is stored, so it never points at a partial one.
        Pipeline stages upload in step, so that every stage's part exists before rank 0 announces it.
        """
        position = {"epoch": epoch, "step": step, "steps_per_epoch": steps, "world": self.world}
        if self.req.parallel == "pp":
            state = self._pp_piece.state_dict()
        elif self.rank != 0:
            return
        else:
            state = full.state_dict()
        body = checkpoint_to_bytes(state, opt, position)
        self._last_checkpoint = time.monotonic()
        prefix = f"ckpt/{self.job_id}/a{self.attempt}-e{epoch}-s{step}"
        objects = [f"{prefix}-r{r}" for r in range(self.world)] if self.req.parallel == "pp" else [f"{prefix}-r0"]
        ckpt = Checkpoint(job_id=self.job_id, attempt=self.attempt, step=step, epoch=epoch,
                          offset=step * self.req.batch_size, objects=objects, world=self.world)  # fmt: skip
        self.wait_checkpoint()
        if self.req.parallel == "pp":
            self.bridge.call(self._store(f"{prefix}-r{self.rank}", body, None))
            dist.barrier()  # every stage's part is stored before the checkpoint is announced
            if self.rank == 0:
                self.bridge.call(self.jobs.put(checkpoint_key(self.job_id), _json.encode(ckpt)))
        else:
            self._pending_checkpoint = self.bridge.post(self._store(objects[0], body, ckpt))

    async def _store(self, name: str, body: bytes, announce: Checkpoint | None) -> None:
        store = await artifacts(self.js, self.names, self.config.js_replicas)
        await put_object(store, name, body)
        if announce is not None:
            await self.jobs.put(checkpoint_key(self.job_id), _json.encode(announce))

    def wait_checkpoint(self) -> None:
        pending, self._pending_checkpoint = self._pending_checkpoint, None
        if pending is not None:
            pending.result(120)

    def _resume(self, full: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> tuple[int, int]:
        """Load the job's last checkpoint into the model and optimizer; the (epoch, step) to start at.

        No checkpoint recorded yet: from the start.  One recorded that cannot be read (a record that
        does not decode, an object missing from the store, a body that does not load into this
        model) fails the job with the cause: starting again from step 0 would silently throw the
        training done so far away, and a retry would find the same.  A lookup that NATS did not
        answer (timeout, lost connection) raises: the attempt fails and the agent tries again.
        The start is recorded in ``attempt.<job>.<attempt>`` (``AttemptRecord``).
        """
        record = AttemptRecord(
            job_id=self.job_id,
            attempt=self.attempt,
            world=self.world,
            steps_per_epoch=steps,
            start_epoch=0,
            start_step=0,
        )
        try:
            entry = self.bridge.call(self.jobs.get(checkpoint_key(self.job_id)))
        except KeyNotFoundError:  # KeyDeletedError too
            log.info(
                "rank %d: no checkpoint recorded for %s: training starts at epoch 0 step 0", self.rank, self.job_id
            )
            self._account(record)
            return 0, 0
        try:
            ckpt = msgspec.json.decode(entry.value or b"", type=Checkpoint)
        except msgspec.DecodeError as exc:
            self._fail(f"the checkpoint record of job {self.job_id} does not decode ({exc}): cannot resume")
        if self.req.parallel == "pp" and ckpt.world != self.world:
            self._fail(f"the checkpoint has {ckpt.world} pipeline stages; this attempt has {self.world}")
        name = ckpt.objects[self.rank] if self.req.parallel == "pp" else ckpt.objects[0]
        where = f"checkpoint {name} (attempt {ckpt.attempt}, epoch {ckpt.epoch} step {ckpt.step})"
        store = self.bridge.call(artifacts(self.js, self.names, self.config.js_replicas))
        try:
            result = self.bridge.call(store.get(name))
        except NotFoundError:
            self._fail(f"{where} is recorded for job {self.job_id} but missing from the artifacts store: cannot resume")
        try:
            model_state, opt_state, position = checkpoint_from_bytes(bytes(result.data or b""))
            target = self._pp_piece if self.req.parallel == "pp" else full
            target.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
            epoch, at, per_epoch = int(position["epoch"]), int(position["step"]), int(position["steps_per_epoch"])
        except Exception as exc:
            self._fail(f"{where} of job {self.job_id} cannot be loaded: {type(exc).__name__}: {exc}")
        # A different world size changes the steps per epoch: keep the same fraction of the epoch.
        step = data.resume_step(at, per_epoch, steps)
        log.info("rank %d resumes from %s at epoch %d step %d of %d", self.rank, name, epoch, step, steps)
        self._account(
            msgspec.structs.replace(
                record,
                start_epoch=epoch,
                start_step=step,
                checkpoint=name,
                checkpoint_attempt=ckpt.attempt,
                checkpoint_epoch=epoch,
                checkpoint_step=at,
                checkpoint_steps_per_epoch=per_epoch,
                checkpoint_world=int(position.get("world", ckpt.world)),
            )
        )
        return epoch, step

    def _account(self, record: AttemptRecord) -> None:
        if self.rank == 0:
            self._record = record
            self.bridge.call(self.jobs.put(attempt_key(self.job_id, self.attempt), _json.encode(record)))

    def _account_end(self, full: torch.nn.Module) -> None:
        """Rank 0 records the steps this attempt trained and (dp) every rank's parameter digest."""
        weights: list[str] = []
        if self.req.parallel == "dp":
            digest = parameters_digest(full)
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, digest)
            weights = [str(d) for d in gathered]
        if self.rank == 0 and self._record is not None:
            self._account(msgspec.structs.replace(self._record, steps_trained=self.steps_trained, weights=weights))

    # -- reporting ---------------------------------------------------------------------------
    def _progress(self, epoch: int, step: int, steps: int, loss: float, rate: float) -> None:
        progress = TrainProgress(
            job_id=self.job_id,
            attempt=self.attempt,
            world=self.world,
            epoch=epoch,
            step=step,
            steps_per_epoch=steps,
            loss=loss,
            samples_per_s=rate,
            ranks=list(range(self.world)),
        )
        self.bridge.post(self.jobs.put(progress_key(self.job_id), _json.encode(progress)))

    def _fail(self, error: str) -> NoReturn:
        """End the attempt with an error a retry cannot fix.  Every rank that finds it writes the
        result before exiting: its agent reads the result when this process ends, and another
        rank's copy may not be stored yet (a missing result reads as a crash, i.e. a restart)."""
        result = TrainResult(job_id=self.job_id, ok=False, error=error)
        self.bridge.call(self.jobs.put(result_key(self.job_id, self.attempt), _json.encode(result)))
        raise SystemExit(error)

    # -- the end: evaluate, store, register ---------------------------------------------------
    def _finish(self, full: torch.nn.Module, manifest: DatasetManifest, task: ModelTask) -> None:
        if self.req.parallel == "pp":
            full = self._gather_pipeline(full)
            if self.rank != 0:
                return
        full = full.cpu().eval()
        metrics = self._evaluate(full, manifest, task)
        if self.train_seconds:  # the training loop's own throughput (global samples/s), for benchmarks
            metrics["train_samples_per_s"] = self.train_samples / self.train_seconds
            metrics["train_seconds"] = self.train_seconds
        store = self.bridge.call(artifacts(self.js, self.names, self.config.js_replicas))
        name = f"models/{self.req.model}/{self.job_id}.safetensors"
        self.bridge.call(put_object(store, name, weights_to_bytes(full.state_dict())))
        inputs = [c for c in manifest.columns if c.name in ("x", "tokens")]
        version = ModelVersion(
            model=self.req.model,
            version="",
            artifact=name,
            factory=self.req.factory,
            kwargs=self.req.kwargs,
            task=task,
            inputs=inputs,
            metrics=metrics,
            dataset=f"{manifest.dataset}@{manifest.version}",
            dataset_trace_id=manifest.trace_id,
            hyperparameters=msgspec.to_builtins(self.req),
            job_id=self.job_id,
            trace_id=self.job.trace_id,
            created_at=rfc3339_now(),
            label_classes=manifest.label_classes,
            tokenizer=manifest.tokenizer,
            chat_template=declared_chat_template(full) if task == "lm" else None,
        )
        registry = self.bridge.call(self.js.key_value(self.names.registry_bucket))
        registered = self.bridge.call(register(registry, version))
        result = TrainResult(
            job_id=self.job_id, ok=True, model_version=registered.version, metrics=metrics, losses=self.losses
        )
        self.bridge.call(self.jobs.put(result_key(self.job_id, self.attempt), _json.encode(result)))
        log.info("registered %s@%s %s", self.req.model, registered.version, metrics)

    def _gather_pipeline(self, full: torch.nn.Module) -> torch.nn.Module:
        """Bring every stage's weights to rank 0, into the full model (same parameter names)."""
        mine = {id(p) for p in self._pp_piece.parameters()} | {id(b) for b in self._pp_piece.buffers()}
        state = {k: v.detach().cpu() for k, v in full.state_dict(keep_vars=True).items() if id(v) in mine}
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.world
        dist.gather_object(state, gathered if self.rank == 0 else None, dst=0)
        if self.rank == 0:
            merged: dict[str, torch.Tensor] = {}
            for part in gathered:
                merged.update(part or {})
            full.load_state_dict(merged)
        return full

    def _evaluate(self, full: torch.nn.Module, manifest: DatasetManifest, task: str) -> dict[str, float]:
        reader = DatasetReader(self.js, self.names, manifest)
        shards = list(range(len(manifest.shards)))
        arrays = self.bridge.call(reader.load(shards))
        _, held = data.split(arrays, [manifest.shards[s].records for s in shards], self.req.eval_fraction)
        if not len(next(iter(held.values()))):
            return {}
        with torch.no_grad():
            if task == "lm":
                tokens = torch.from_numpy(held["tokens"][:512].astype(np.int64))
                loss = float(lm_loss(full(tokens[:, :-1]), tokens[:, 1:]))
                return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)), "eval_records": len(tokens)}
            x, y = torch.from_numpy(held["x"]), torch.from_numpy(held["y"])
            logits = full(x)
            return {
                "eval_accuracy": float((logits.argmax(-1) == y).float().mean()),
                "eval_loss": float(torch.nn.functional.cross_entropy(logits, y)),
                "eval_records": float(len(y)),
            }


def parameters_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' names and exact values (buffers left out: DDP gives every rank
    rank 0's buffers before a forward pass, then each updates them on its own batch)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a training attempt (started by a trainer agent)")
    parser.add_argument("--job", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True)
    args = parser.parse_args()
    config = load_mesh_config()
    setup_logging(
        f"trainer-r{args.rank}", config.instance or str(os.getpid()), fmt=config.log_format, level=config.log_level
    )
    trainer = load_trainer_config()
    torch.set_num_threads(max(1, trainer.threads))
    try:
        Worker(args, config, trainer).run()
    except SystemExit:
        raise
    except Exception:
        log.exception("rank %d of %s failed", args.rank, args.job)
        sys.exit(1)
    asyncio.set_event_loop(None)


if __name__ == "__main__":
    main()
