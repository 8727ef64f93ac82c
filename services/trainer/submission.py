"""The checks on a submitted training job (no NATS, no asyncio): each returns the request as it
will be stored, or raises ``BadRequest`` with what to change.

The agent runs them in this order, so the first problem is the one reported: the request's own
fields (:func:`check_request`), then the model (:func:`check_model`, before anything is imported
from outside the trusted packages), then the dataset it names (:func:`check_dataset`, once the
agent has read the manifest).
"""

from __future__ import annotations

import msgspec

from shared.errors import BadRequest
from shared.names import check_name
from shared.schemas import DEVICES, OPTIMIZERS, DatasetManifest, TrainRequest

SUBMISSION_ID_MAX = 64  # characters: it becomes part of the job's id, its keys and object names


def _check_names(req: TrainRequest) -> None:
    """The model name and the submission id become parts of keys, subjects and object names."""
    check_name(req.model, "model name")
    if req.submission_id is not None:
        check_name(req.submission_id, "submission id")
    if req.submission_id is not None and len(req.submission_id) > SUBMISSION_ID_MAX:
        raise BadRequest(f"submission id must be at most {SUBMISSION_ID_MAX} characters")


def check_request(req: TrainRequest) -> TrainRequest:
    """Names, parallel mode and sizes; ``min_nodes`` defaults to ``nodes``."""
    _check_names(req)
    if req.parallel not in ("dp", "pp"):
        raise BadRequest(f"parallel must be dp or pp (got {req.parallel!r})")
    if req.optimizer not in OPTIMIZERS:
        raise BadRequest(f"optimizer must be {' or '.join(OPTIMIZERS)} (got {req.optimizer!r})")
    if req.device not in DEVICES:
        raise BadRequest(f"device must be {', '.join(DEVICES)} (got {req.device!r})")
    if req.nodes < 1 or (req.parallel == "pp" and req.nodes < 2):
        raise BadRequest("nodes must be ≥ 1 (≥ 2 for pp: one pipeline stage per node)")
    min_nodes = req.min_nodes or req.nodes
    if not 1 <= min_nodes <= req.nodes or (req.parallel == "pp" and min_nodes != req.nodes):
        raise BadRequest(f"min_nodes must be between 1 and nodes ({req.nodes}); pp needs all its stages")
    if req.parallel == "dp" and req.batch_size % req.nodes:
        raise BadRequest(f"batch size {req.batch_size} must divide evenly over {req.nodes} nodes")
    if req.parallel == "pp" and req.batch_size % req.microbatches:
        raise BadRequest(f"batch size {req.batch_size} must divide into {req.microbatches} micro-batches")
    if req.epochs < 1 or req.batch_size < 1 or req.lr <= 0:
        raise BadRequest("epochs and batch size must be ≥ 1 and lr > 0")
    return msgspec.structs.replace(req, min_nodes=min_nodes)


def check_model(req: TrainRequest, packages: list[str]) -> None:
    """Refuse a factory outside the trusted packages, or kwargs that are not plain data, before
    anything is imported; then build the model once on the meta device (no memory for weights)
    to check that it builds.  A factory that cannot build on meta is built for real: only a
    trusted package's factory gets this far, and the zoo's bound their sizes first.

    Blocking (imports, builds): the agent runs it in a thread."""
    from zoo import ModelSpec, build_model, check_factory, check_kwargs

    check_factory(req.factory, packages)
    check_kwargs(req.kwargs)
    spec = ModelSpec(factory=req.factory, kwargs=req.kwargs)
    try:
        build_model(spec, packages, device="meta")
    except BadRequest:
        build_model(spec, packages)


def check_dataset(req: TrainRequest, manifest: DatasetManifest) -> TrainRequest:
    """Enough shards for data parallelism over ``min_nodes``; the dataset pinned to the version
    the manifest is, so every attempt reads the same data."""
    min_nodes = req.min_nodes or req.nodes
    if req.parallel == "dp" and len(manifest.shards) < min_nodes:
        raise BadRequest(
            f"dataset {req.dataset} has {len(manifest.shards)} shards, fewer than the "
            f"{min_nodes} nodes: ingest it with --shards ≥ {req.nodes}"
        )
    return msgspec.structs.replace(req, dataset=f"{manifest.dataset}@{manifest.version}", min_nodes=min_nodes)


def job_id(req: TrainRequest, now: float) -> str:
    """The new job's id: from the client's submission id when it sent one (a resend names the
    same job), else from the time in milliseconds."""
    return f"{req.model}-{req.submission_id or format(int(now * 1000), 'x')}"


def check_resend(stored: TrainRequest, resent: TrainRequest) -> None:
    """A submission id names one request: the same again is a resend, another is refused."""
    if stored != resent:
        raise BadRequest(
            f"submission id {resent.submission_id} already names a job submitted with a different request; "
            "send a new submission id for a new job"
        )
