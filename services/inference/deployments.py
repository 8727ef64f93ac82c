"""What an inference worker serves (pure: no NATS, no asyncio): deploy requests checked, and the
worker's deployment records reconciled into a plan.

A served version is named by its key, ``model@version``.  Several records (refs: ``latest``, an
alias, a version) may point at one version; the newest record's batching settings win.

:func:`reconcile` turns the records, what is served and what is loading into a :class:`Plan`:

- **load** every deployed version that is neither served nor loading (a version whose load
  failed is neither, so the next reconcile tries it again);
- **update** a served version whose record changed only its settings (batch size, wait);
- **retire** a served version no record names any more, but only once no version of that model
  is loading: a ref moved to a new version keeps serving the old one until the new one is up,
  so the move never leaves a gap.  The caller reconciles again when a load ends.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from shared.errors import BadRequest
from shared.names import check_token
from shared.schemas import Deployment, DeployRequest


def served_key(model: str, version: str) -> str:
    return f"{model}@{version}"


def model_of(key: str) -> str:
    return key.split("@", 1)[0]


def check_deploy(req: DeployRequest) -> None:
    """A deploy request's names and sizes, before the registry is asked."""
    try:
        check_token(req.model, "model name")
        check_token(req.ref, "version or alias")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if req.max_batch_size < 1 or req.max_wait_ms < 0 or req.replicas < 0:
        raise BadRequest("max_batch_size must be ≥ 1, max_wait_ms ≥ 0 and replicas ≥ 0")


def previous_version(before: Deployment | None, version: str) -> str:
    """The version a ref pointed at before this deploy (callers fall back to it while ``version``
    loads); a redeploy of the same version keeps the one before that."""
    if before is None:
        return ""
    return before.version if before.version != version else before.previous


def desired(records: Iterable[Deployment]) -> dict[str, Deployment]:
    """The versions the records name, by key, each with its newest record's settings."""
    out: dict[str, Deployment] = {}
    for record in sorted(records, key=lambda d: d.updated_at):
        out[served_key(record.model, record.version)] = record  # the newest record's settings win
    return out


@dataclass(frozen=True)
class Plan:
    """What to change so that the worker serves what the records say."""

    load: dict[str, Deployment] = field(default_factory=dict)  # key → its deployment, to load
    update: dict[str, Deployment] = field(default_factory=dict)  # served; only settings changed
    retire: list[str] = field(default_factory=list)  # served keys to stop serving


def reconcile(records: Iterable[Deployment], served: Mapping[str, Deployment], loading: Collection[str]) -> Plan:
    """The plan from the deployment ``records``, the ``served`` versions (key → the deployment
    they were loaded or last updated with) and the keys ``loading``."""
    wanted = desired(records)
    load: dict[str, Deployment] = {}
    update: dict[str, Deployment] = {}
    for key, deployment in wanted.items():
        current = served.get(key)
        if current is None and key not in loading:
            load[key] = deployment
        elif current is not None and current != deployment:
            update[key] = deployment
    busy_models = {model_of(key) for key in [*loading, *load]}
    retire = [key for key in served if key not in wanted and model_of(key) not in busy_models]
    return Plan(load=load, update=update, retire=retire)
