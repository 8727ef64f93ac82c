"""Which version serves a request (pure: no NATS): the router and the Python client share it.

1. A version named by the caller, if it is served (:meth:`RoutingTable.check_served`), else a 404.
2. Else the model's split (sticky by a key, else weighted at random).
3. Else the model's deployment: the one of ``latest`` if deployed, else the most recent.
   While a redeployed ref's new version loads, the version it replaced is the fallback, tried
   only when no worker answered (the request never ran).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from shared.errors import NotFound
from shared.names import is_deploy_key, split_key_model
from shared.schemas import DEFAULT_MAX_BATCH_SIZE, Deployment, Split
from shared.splits import choose

_deployment = msgspec.json.Decoder(Deployment)
_split = msgspec.json.Decoder(Split)


@dataclass
class Route:
    version: str
    split: Split | None = None
    fallback: str | None = None


@dataclass
class RoutingTable:
    deployments: dict[str, Deployment] = field(default_factory=dict)  # by deployments-bucket key
    splits: dict[str, Split] = field(default_factory=dict)  # by model

    def default(self, model: str) -> Deployment | None:
        records = [d for d in self.deployments.values() if d.model == model]
        if not records:
            return None
        return next((d for d in records if d.ref == "latest"), None) or max(records, key=lambda d: d.updated_at)

    def versions(self, model: str) -> list[str]:
        """Every version of ``model`` a request may name, in version order: each deployment's
        version (and, while a redeployment loads, the one it replaced) and every version its
        split names (variants, mirrors, control)."""
        named: set[str] = set()
        for d in self.deployments.values():
            if d.model == model:
                named.update(v for v in (d.version, d.previous) if v)
        split = self.splits.get(model)
        if split is not None:
            named.update(v.version for v in split.variants)
            named.update(m.version for m in split.mirrors)
            named.update([split.control] if split.control else [])
        return sorted(named, key=version_order)

    def check_served(self, model: str, version: str) -> None:
        """Nothing when a request may name ``model@version`` (see :meth:`versions`), else a
        404 naming it and what is served, so that clients do not retry (a 503 invites retries)."""
        versions = self.versions(model)
        if version in versions:
            return
        if not versions:
            raise NotFound(f"model {model!r} is not deployed (aimesh deploy {model})")
        raise NotFound(
            f"version {version!r} of model {model!r} is not deployed (deployed: {', '.join(versions)}; "
            f"aimesh deploy {model}@{version})"
        )

    def route(self, model: str, version: str | None = None, key: str | None = None) -> Route:
        if version:
            self.check_served(model, version)
            return Route(version)
        split = self.splits.get(model)
        if split is not None:
            return Route(choose(split, key), split)
        deployment = self.default(model)
        if deployment is None:
            raise NotFound(f"model {model!r} is not deployed (aimesh deploy {model})")
        fallback = deployment.previous if deployment.previous and deployment.previous != deployment.version else None
        return Route(deployment.version, None, fallback)

    def apply(self, key: str, value: bytes | None) -> Deployment | Split | None:
        """Take one entry of the deployments (``deploy.*``) or experiments (``split.*``) bucket;
        an empty value is a delete.  Returns what was stored, if anything."""
        if is_deploy_key(key):
            if not value:
                self.deployments.pop(key, None)
                return None
            deployment = _deployment.decode(value)
            self.deployments[key] = deployment
            return deployment
        model = split_key_model(key)
        if model is not None:
            if not value:
                self.splits.pop(model, None)
                return None
            split = _split.decode(value)
            self.splits[model] = split
            return split
        return None

    def max_batch_size(self, model: str, version: str) -> int:
        """The batch size ``model@version`` is deployed with (the smallest, if deployed twice;
        a version only a split names gets the default)."""
        sizes = [d.max_batch_size for d in self.deployments.values() if d.model == model and d.version == version]
        return min(sizes) if sizes else DEFAULT_MAX_BATCH_SIZE

    def models(self) -> set[str]:
        return {d.model for d in self.deployments.values()}


def version_order(version: str) -> tuple[int, int, str]:
    """Numbers in numeric order (2 before 10), then other names."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
