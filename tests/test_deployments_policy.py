"""The inference worker's deployment plan, rule by rule, on synthetic records."""

from __future__ import annotations

from typing import Any

import pytest

from services.inference.deployments import Plan, check_deploy, desired, previous_version, reconcile
from shared.errors import BadRequest
from shared.schemas import Deployment, DeployRequest


def record(
    version: str, ref: str = "latest", model: str = "m", at: str = "2026-01-01T00:00:01Z", **kw: Any
) -> Deployment:
    return Deployment(model=model, ref=ref, version=version, updated_at=at, **kw)


# -- deploy requests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("req", "message"),
    [
        (DeployRequest(model="bad name"), "model name"),
        (DeployRequest(model="m", ref="a/b"), "version or alias"),
        (DeployRequest(model="m", max_batch_size=0), "max_batch_size must be ≥ 1"),
        (DeployRequest(model="m", max_wait_ms=-1), "max_wait_ms ≥ 0"),
        (DeployRequest(model="m", replicas=-1), "replicas ≥ 0"),
    ],
)
def test_a_bad_deploy_request_is_refused_with_what_to_change(req: DeployRequest, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_deploy(req)


def test_a_good_deploy_request_passes() -> None:
    check_deploy(DeployRequest(model="m", ref="prod", replicas=0, max_wait_ms=0))


def test_previous_is_the_version_the_ref_pointed_at_before() -> None:
    assert previous_version(None, "2") == ""
    assert previous_version(record("1"), "2") == "1"
    assert previous_version(record("2", previous="1"), "2") == "1"  # a redeploy of the same version


# -- desired -----------------------------------------------------------------------------------------------
def test_refs_naming_one_version_make_one_entry_with_the_newest_settings() -> None:
    old = record("1", ref="latest", at="2026-01-01T00:00:01Z", max_batch_size=8)
    new = record("1", ref="prod", at="2026-01-01T00:00:02Z", max_batch_size=16)
    assert desired([new, old]) == {"m@1": new}


# -- reconcile ------------------------------------------------------------------------------------------------
def test_a_new_deployment_is_loaded() -> None:
    v1 = record("1")
    assert reconcile([v1], {}, set()) == Plan(load={"m@1": v1})


def test_a_version_loading_or_served_as_deployed_is_left_alone() -> None:
    v1 = record("1")
    assert reconcile([v1], {}, {"m@1"}) == Plan()
    assert reconcile([v1], {"m@1": v1}, set()) == Plan()


def test_changed_batching_settings_update_the_served_version_in_place() -> None:
    v1, wider = record("1"), record("1", max_batch_size=64, at="2026-01-01T00:00:05Z")
    assert reconcile([wider], {"m@1": v1}, set()) == Plan(update={"m@1": wider})


def test_a_redeployed_ref_keeps_the_previous_version_until_the_new_one_loads() -> None:
    v1, v2 = record("1"), record("2", previous="1", at="2026-01-01T00:00:05Z")
    assert reconcile([v2], {"m@1": v1}, set()) == Plan(load={"m@2": v2})  # v1 stays
    assert reconcile([v2], {"m@1": v1}, {"m@2"}) == Plan()  # still loading: v1 stays
    assert reconcile([v2], {"m@1": v1, "m@2": v2}, set()) == Plan(retire=["m@1"])  # up: v1 goes


def test_a_failed_load_is_tried_again_at_the_next_reconcile() -> None:
    v1 = record("1")
    assert reconcile([v1], {}, set()).load == {"m@1": v1}  # neither served nor loading


def test_a_deleted_deployment_is_retired() -> None:
    assert reconcile([], {"m@1": record("1")}, set()) == Plan(retire=["m@1"])


def test_another_models_load_does_not_hold_up_a_retirement() -> None:
    other = record("7", model="n")
    assert reconcile([other], {"m@1": record("1")}, {"n@7"}) == Plan(retire=["m@1"])
    assert reconcile([other], {"m@1": record("1")}, {"n@7", "m@3"}) == Plan()  # m is loading: m@1 waits
