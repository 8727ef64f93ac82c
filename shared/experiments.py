"""Traffic splits in the experiments bucket (``split.<model>``): written by the router's admin
API and ``aimesh split``, watched by every router instance (applied without a restart)."""

from __future__ import annotations

import contextlib
import uuid

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from shared.clock import rfc3339_now
from shared.errors import BadRequest
from shared.kv import open_bucket
from shared.names import Names, check_token, split_key
from shared.registry import get_version, registry_kv
from shared.schemas import Split


async def put_split(js: JetStreamContext, names: Names, split: Split) -> Split:
    """Validate (the model and every version exist, a positive weight) and store a split."""
    try:
        check_token(split.model, "model name")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not split.variants or sum(max(v.weight, 0) for v in split.variants) <= 0:
        raise BadRequest("a split needs at least one variant with a positive weight")
    if any(not 0 <= m.percent <= 100 for m in split.mirrors):
        raise BadRequest("mirror percentages must be between 0 and 100")
    versions = [v.version for v in split.variants]
    if split.control and split.control not in versions:
        raise BadRequest(f"control {split.control!r} is not one of the variants {versions}")
    check_guardrails(split)
    registry = await registry_kv(js, names)
    for version in set(versions) | {m.version for m in split.mirrors}:
        await get_version(registry, split.model, version)  # 404 when there is no such version
    # A user's write starts a new experiment: statistics are kept per experiment id.
    split = msgspec.structs.replace(
        split, updated_at=rfc3339_now(), experiment=uuid.uuid4().hex[:12], state="running", decided_at=""
    )
    kv = await open_bucket(js, names.experiments_bucket, create=True)
    assert kv is not None
    await kv.put(split_key(split.model), msgspec.json.encode(split))
    return split


def check_guardrails(split: Split) -> None:
    g = split.guardrails
    if g is None:
        return
    if g.max_error_rate is not None and not 0 <= g.max_error_rate <= 1:
        raise BadRequest(f"guardrails.max_error_rate must be between 0 and 1, not {g.max_error_rate}")
    if g.max_p99_ms is not None and g.max_p99_ms <= 0:
        raise BadRequest(f"guardrails.max_p99_ms must be positive, not {g.max_p99_ms}")
    if g.min_reward_lift < 0:
        raise BadRequest(f"guardrails.min_reward_lift must be ≥ 0, not {g.min_reward_lift}")
    if not 0 < g.alpha < 1:
        raise BadRequest(f"guardrails.alpha must be between 0 and 1 (exclusive), not {g.alpha}")
    if g.min_samples < 2 or g.min_requests < 1:
        raise BadRequest("guardrails.min_samples must be ≥ 2 and min_requests ≥ 1")
    if len(split.variants) < 2:
        raise BadRequest("an experiment with guardrails needs a control and at least one candidate variant")


async def delete_split(js: JetStreamContext, names: Names, model: str) -> None:
    """Remove ``model``'s split; none (or no experiments bucket yet) is already the wanted state."""
    try:
        check_token(model, "model name")  # "*" or "a.b" would name other keys, or none
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    key = split_key(model)
    with contextlib.suppress(BucketNotFoundError, KeyNotFoundError):
        kv = await js.key_value(names.experiments_bucket)
        await kv.delete(key)
