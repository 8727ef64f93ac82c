"""The training rendezvous, decision by decision, on synthetic job records at explicit times."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.trainer import rendezvous
from shared.errors import BadRequest
from shared.schemas import TrainJob, TrainRequest, TrainResult

REQUEST = TrainRequest(model="m", factory="zoo.classifier:mlp", dataset="digits@1", nodes=2, min_nodes=2)


def job(state: str = "forming", **changes: Any) -> TrainJob:
    request = msgspec.structs.replace(REQUEST, **changes.pop("request", {}))
    return TrainJob(job_id="m-1", request=request, state=state, forming_deadline=100.0, **changes)


def running(**changes: Any) -> TrainJob:
    return job("running", members=["a", "b"], world=2, master="127.0.0.1:9", **changes)


# -- submit and resume ------------------------------------------------------------------------------
def test_a_new_job_forms_attempt_1_with_its_deadline() -> None:
    new = rendezvous.new_job("m-1", REQUEST, 10.0, "2026-01-01T00:00:00Z", "t" * 32)
    assert (new.state, new.attempt, new.members, new.restarts) == ("forming", 1, [], 0)
    assert new.forming_deadline == 10.0 + REQUEST.wait_nodes_s
    assert new.created_at == new.updated_at == "2026-01-01T00:00:00Z"
    assert new.trace_id == "t" * 32


def test_resume_forms_a_failed_job_again_with_its_restart_budget_renewed() -> None:
    failed = job("failed", attempt=3, restarts=3, members=["a"], world=1, master="h:1", error="boom")
    assert rendezvous.resume(failed, 50.0) == {
        "state": "forming",
        "attempt": 4,
        "members": [],
        "master": "",
        "world": 0,
        "restarts": 0,
        "error": "",
        "forming_deadline": 50.0 + REQUEST.wait_nodes_s,
    }


@pytest.mark.parametrize("state", ["forming", "starting", "running", "complete"])
def test_only_a_failed_job_can_be_resumed(state: str) -> None:
    with pytest.raises(BadRequest, match=f"job m-1 is {state}: only a failed job can be resumed"):
        rendezvous.resume(job(state), 0.0)


# -- join ---------------------------------------------------------------------------------------------
def test_a_join_appends_the_node_and_its_index_is_the_rank() -> None:
    assert rendezvous.join(job(), "a", busy=False) == {"members": ["a"]}


def test_the_join_that_completes_the_set_starts_the_job() -> None:
    assert rendezvous.join(job(members=["a"]), "b", busy=False) == {
        "members": ["a", "b"],
        "state": "starting",
        "world": 2,
    }


def test_a_busy_node_a_member_or_a_spare_over_a_full_set_does_not_join() -> None:
    assert rendezvous.join(job(), "a", busy=True) is None  # its rank belongs to another job
    assert rendezvous.join(job(members=["a"]), "a", busy=False) is None
    assert rendezvous.join(job(members=["a", "b"]), "c", busy=False) is None  # a spare waits


# -- the forming deadline -------------------------------------------------------------------------------
def test_a_forming_job_waits_until_its_deadline() -> None:
    assert rendezvous.deadline(job(members=["a"]), 100.0) is None
    assert rendezvous.deadline(job("starting", members=["a"]), 1000.0) is None  # not forming: no deadline


def test_at_the_deadline_with_min_nodes_joined_the_job_starts_with_the_members_it_has() -> None:
    forming = job(members=["a"], request={"nodes": 3, "min_nodes": 1})
    assert rendezvous.deadline(forming, 100.5) == {"state": "starting", "world": 1}


def test_at_the_deadline_below_min_nodes_the_job_fails_saying_what_it_waited_for() -> None:
    forming = job(members=["a"], request={"nodes": 3, "min_nodes": None, "wait_nodes_s": 2.0})
    change = rendezvous.deadline(forming, 100.5)
    assert change is not None and change["state"] == "failed"
    assert change["error"] == (
        "waited 2s for 3 trainer nodes (at least 3); 1 joined: "
        "start more trainers (aimesh run trainer) or lower --nodes"
    )


# -- lost members ------------------------------------------------------------------------------------------
def test_a_member_whose_heartbeat_expired_regroups_the_job() -> None:
    change = rendezvous.lost_members(running(), {"a"}, 200.0)
    assert change is not None
    assert change["state"] == "forming" and change["error"] == "node b stopped sending heartbeats"


def test_live_members_or_a_forming_job_change_nothing() -> None:
    assert rendezvous.lost_members(running(), {"a", "b", "spare"}, 200.0) is None
    assert rendezvous.lost_members(job(members=["a"]), set(), 200.0) is None  # forming: its deadline decides


def test_a_node_is_lost_only_once_missing_from_sound_views_for_the_grace() -> None:
    absences = rendezvous.Absences(grace_s=2.0)
    assert absences.lost(["a", "b"], {"a"}, True, 10.0) == set()  # first missed: counting starts
    assert absences.lost(["a", "b"], {"a"}, True, 11.9) == set()
    assert absences.lost(["a", "b"], {"a"}, True, 12.0) == {"b"}
    assert absences.lost(["a", "b"], {"a", "b"}, True, 12.5) == set()  # it beat again: forgotten
    assert absences.lost(["a", "b"], {"a"}, True, 13.0) == set()


def test_an_unsound_view_judges_no_one_and_restarts_the_count() -> None:
    """A partition healing: the heartbeat bucket refused writes, so every heartbeat expired."""
    absences = rendezvous.Absences(grace_s=2.0)
    assert absences.lost(["a", "b"], set(), True, 10.0) == set()
    assert absences.lost(["a", "b"], set(), False, 13.0) == set()  # our own beat was not stored
    assert absences.lost(["a", "b"], None, True, 14.0) == set()  # the listing could not be read
    assert absences.lost(["a", "b"], set(), True, 15.0) == set()  # counting again from here
    assert absences.lost(["a", "b"], {"a"}, True, 16.0) == set()  # 1 s: not yet
    assert absences.lost(["a", "b"], {"a"}, True, 17.0) == {"b"}


# -- a rank exits --------------------------------------------------------------------------------------------
def exited(j: TrainJob, *, rank: int, code: int, result: TrainResult | None, attempt: int = 1) -> Any:
    return rendezvous.rank_exited(j, attempt=attempt, rank=rank, node="a", code=code, result=result, now=200.0)


OK = TrainResult(job_id="m-1", ok=True, model_version="3", metrics={"accuracy": 0.9})


def test_rank_0_exiting_0_with_an_ok_result_completes_the_job() -> None:
    assert exited(running(error="earlier"), rank=0, code=0, result=OK) == {
        "state": "complete",
        "model_version": "3",
        "metrics": {"accuracy": 0.9},
        "error": "",
    }


def test_a_result_that_is_not_ok_fails_the_job_with_no_retry() -> None:
    nan = TrainResult(job_id="m-1", ok=False, error="loss became nan at step 3")
    for rank, code in [(0, 1), (1, 1), (0, 0)]:
        assert exited(running(), rank=rank, code=code, result=nan) == {
            "state": "failed",
            "error": "loss became nan at step 3",
        }


def test_a_crash_with_no_result_regroups_from_the_checkpoint_within_the_budget() -> None:
    assert exited(running(attempt=2, restarts=1), attempt=2, rank=1, code=-9, result=None) == {
        "state": "forming",
        "attempt": 3,
        "members": [],
        "master": "",
        "world": 0,
        "restarts": 2,
        "error": "rank 1 (node a) exited with code -9",
        "forming_deadline": 200.0 + REQUEST.wait_nodes_s,
    }


def test_rank_0_exiting_0_with_no_result_regroups() -> None:
    change = exited(running(), rank=0, code=0, result=None)
    assert change["state"] == "forming" and change["error"] == "rank 0 (node a) exited with code 0 but no result"


def test_a_rank_other_than_0_exiting_0_changes_nothing() -> None:
    assert exited(running(), rank=1, code=0, result=None) is None  # rank 0 reports the outcome
    assert exited(running(), rank=1, code=0, result=OK) is None


def test_past_max_restarts_the_job_fails_with_the_reason() -> None:
    change = exited(running(restarts=3, request={"max_restarts": 3}), rank=1, code=1, result=None)
    assert change == {
        "state": "failed",
        "error": "rank 1 (node a) exited with code 1; gave up after 3 restarts (max_restarts)",
    }
    assert rendezvous.regroup(running(request={"max_restarts": 0}), "why", 0.0)["state"] == "failed"


def test_an_exit_from_an_attempt_the_job_moved_on_from_is_not_reported() -> None:
    assert rendezvous.moved_on(running(attempt=2), 1)
    assert rendezvous.moved_on(job(attempt=1), 1)
    assert not rendezvous.moved_on(running(), 1)
    assert exited(running(attempt=2), attempt=1, rank=0, code=1, result=None) is None
    assert exited(job("failed"), rank=0, code=1, result=None) is None


def test_a_crash_with_no_verdict_yet_waits_for_one() -> None:
    assert rendezvous.needs_grace(1, None)
    assert not rendezvous.needs_grace(0, None)  # a clean exit is not a peer's casualty
    assert not rendezvous.needs_grace(1, OK)


# -- what an agent does on seeing a job ------------------------------------------------------------------------
def test_an_agent_joins_a_forming_job_leads_as_rank_0_and_starts_its_rank_when_running() -> None:
    assert rendezvous.next_step(job(), "c", running=False) == "join"  # join() decides whether it may
    starting = job("starting", members=["a", "b"], world=2)
    assert rendezvous.next_step(starting, "a", running=False) == "lead"
    assert rendezvous.next_step(starting, "b", running=False) is None  # waits for the leader's master
    assert rendezvous.next_step(running(), "b", running=False) == "start"
    assert rendezvous.next_step(running(), "b", running=True) is None  # its rank runs already
    assert rendezvous.next_step(running(), "spare", running=False) is None
    assert rendezvous.next_step(job("complete"), "a", running=False) is None


def test_a_rank_of_an_attempt_that_is_over_is_stale() -> None:
    assert not rendezvous.rank_is_stale(running(), None)
    assert not rendezvous.rank_is_stale(running(), ("m-1", 1, 0))
    assert not rendezvous.rank_is_stale(running(), ("other-1", 5, 0))
    assert rendezvous.rank_is_stale(running(attempt=2), ("m-1", 1, 0))  # regrouped
    assert rendezvous.rank_is_stale(job("failed"), ("m-1", 1, 0))
    assert rendezvous.rank_is_stale(job("complete"), ("m-1", 1, 0))
