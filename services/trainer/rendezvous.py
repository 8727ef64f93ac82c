"""The rendezvous decisions of a training job (pure: no NATS, no asyncio, no clock of its own).

Each function takes a job's control record as an agent last read it (and ``now``, epoch seconds,
where a deadline is involved) and returns the change to make to it, a ``Changes`` mapping of
``TrainJob`` fields, or ``None`` for no change.  The agent (``service.py``) applies a change
with a compare-and-set on ``job.<id>``; when another agent changed the record first, the set
fails and the watch brings the new record, decided again.

- **next step** of an agent that sees a job: join it, lead it (rank 0 of a starting job picks
  the store's port), start its rank, or nothing; a rank of an attempt that is over is stopped.
- **join**: an idle agent that is not yet a member appends itself; the index is its rank.  The
  join that completes the set moves the job to ``starting`` with that world.
- **deadline** (``forming`` past ``forming_deadline``): ``starting`` with the members it has if
  they are at least ``min_nodes``, else ``failed`` saying what it waited for.
- **lost members** (``starting``/``running``, a member's heartbeat gone): regroup.  Gone means
  missing from every listing for ``grace_s`` while this agent's own view was sound (``Absences``):
  when the heartbeat bucket cannot be written or read (a partition healing, a leader election),
  every heartbeat expires at once, and that is the bus, not the nodes.
- **a rank exits**: rank 0 that exits 0 with an ``ok`` result completes the job; a result that
  is not ``ok`` (an error a retry cannot fix: NaN loss) fails it; any other non-zero exit, or
  rank 0 exiting without a result, regroups.
- **regroup**: back to ``forming`` (attempt + 1, members cleared, a new deadline) while the
  restart budget lasts, else ``failed`` with the reason.
- **resume** (a user's request): a ``failed`` job forms again with its restart budget renewed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from shared.errors import BadRequest
from shared.schemas import TrainJob, TrainRequest, TrainResult

TERMINAL = ("complete", "failed")

Changes = dict[str, Any]  # TrainJob fields to replace (``updated_at`` is the caller's)
Step = Literal["join", "lead", "start"]


def new_job(job_id: str, req: TrainRequest, now: float, created_at: str, trace_id: str) -> TrainJob:
    """A submitted job: ``forming``, attempt 1, with its deadline ``wait_nodes_s`` from ``now``."""
    return TrainJob(
        job_id=job_id,
        request=req,
        state="forming",
        forming_deadline=now + req.wait_nodes_s,
        created_at=created_at,
        updated_at=created_at,
        trace_id=trace_id,
    )


def resume(job: TrainJob, now: float) -> Changes:
    """A failed job forms again, restart budget renewed; anything else is refused."""
    if job.state != "failed":
        raise BadRequest(f"job {job.job_id} is {job.state}: only a failed job can be resumed")
    return {
        "state": "forming",
        "attempt": job.attempt + 1,
        "members": [],
        "master": "",
        "world": 0,
        "restarts": 0,
        "error": "",
        "forming_deadline": now + job.request.wait_nodes_s,
    }


def rank_is_stale(job: TrainJob, mine: tuple[str, int, int] | None) -> bool:
    """This agent's rank (``mine``: job, attempt, rank) belongs to an attempt that is over: the
    job ended, or moved to another attempt.  The agent stops it."""
    return mine is not None and mine[0] == job.job_id and (job.state in TERMINAL or job.attempt != mine[1])


def next_step(job: TrainJob, node: str, running: bool) -> Step | None:
    """What ``node`` does on seeing ``job``: ``join`` a forming job; ``lead`` (rank 0 of a
    starting job: pick the store's port and move it to running); ``start`` its rank in a running
    job it is a member of, unless a rank of its own is ``running``; or nothing."""
    if job.state == "forming":
        return "join"
    if job.state == "starting" and job.members and job.members[0] == node:
        return "lead"
    if job.state == "running" and node in job.members and not running:
        return "start"
    return None


def join(job: TrainJob, node: str, busy: bool) -> Changes | None:
    """``node`` appends itself to a forming job's members, unless it is ``busy`` (its rank is
    taken by a job), already a member, or the set is full.  The rank is its index."""
    if busy or node in job.members or len(job.members) >= job.request.nodes:
        return None
    members = [*job.members, node]
    changes: Changes = {"members": members}
    if len(members) == job.request.nodes:
        changes |= {"state": "starting", "world": len(members)}
    return changes


def deadline(job: TrainJob, now: float) -> Changes | None:
    """A forming job past its deadline starts with the members it has, if they are at least
    ``min_nodes``, or fails saying what it waited for."""
    if job.state != "forming" or now <= job.forming_deadline:
        return None
    want, least = job.request.nodes, job.request.min_nodes or job.request.nodes
    if len(job.members) >= least:
        return {"state": "starting", "world": len(job.members)}
    return {
        "state": "failed",
        "error": (
            f"waited {job.request.wait_nodes_s:g}s for {want} trainer nodes (at least {least}); "
            f"{len(job.members)} joined: start more trainers (aimesh run trainer) or lower --nodes"
        ),
    }


def lost_members(job: TrainJob, alive: set[str], now: float) -> Changes | None:
    """A starting or running job with a member whose heartbeat is gone regroups."""
    if job.state not in ("starting", "running"):
        return None
    lost = [m for m in job.members if m not in alive]
    if not lost:
        return None
    return regroup(job, f"node {lost[0]} stopped sending heartbeats", now)


class Absences:
    """Which nodes have been missing from the heartbeat listings long enough to be called lost.

    A view is sound when the listing was read and this agent's own last heartbeat was stored:
    a bucket that refuses writes lets every heartbeat expire, the live ones included.  An unsound
    view forgets what was counted, so absence is only ever measured on sound views, for
    ``grace_s`` (a node TTL or two heartbeats, whichever is longer: long enough for every node to
    beat again once the bucket is back)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._since: dict[str, float] = {}  # node → when a sound view first missed it

    def lost(self, members: Iterable[str], listed: set[str] | None, own_beat_stored: bool, now: float) -> set[str]:
        """The ``members`` missing from every sound view for at least ``grace_s``; ``listed`` is
        None when the listing could not be read."""
        if listed is None or not own_beat_stored:
            self._since.clear()
            return set()
        for node in listed:
            self._since.pop(node, None)
        lost = set()
        for node in members:
            if node not in listed and now - self._since.setdefault(node, now) >= self.grace_s:
                lost.add(node)
        return lost


def moved_on(job: TrainJob, attempt: int) -> bool:
    """The job is no longer running ``attempt``: a rank's exit is not this agent's to report."""
    return job.state != "running" or job.attempt != attempt


def needs_grace(code: int, result: TrainResult | None) -> bool:
    """A rank that crashed with no verdict stored may have died of a peer's exit (a closed
    collective) before the peer's own verdict landed: wait a moment for it."""
    return result is None and code != 0


def rank_exited(
    job: TrainJob, *, attempt: int, rank: int, node: str, code: int, result: TrainResult | None, now: float
) -> Changes | None:
    """The change after ``rank`` (run by ``node``) of ``attempt`` exited with ``code``, given
    the attempt's stored result."""
    if moved_on(job, attempt):
        return None
    if code == 0 and rank == 0 and result is not None and result.ok:
        return {"state": "complete", "model_version": result.model_version, "metrics": result.metrics, "error": ""}
    if result is not None and not result.ok:
        return {"state": "failed", "error": result.error}
    if code != 0 or rank == 0:
        why = f"rank {rank} (node {node}) exited with code {code}" + ("" if code else " but no result")
        return regroup(job, why, now)
    return None


def regroup(job: TrainJob, why: str, now: float) -> Changes:
    """Form again from the last checkpoint (attempt + 1) within ``max_restarts``; past it, fail."""
    if job.restarts >= job.request.max_restarts:
        return {"state": "failed", "error": f"{why}; gave up after {job.restarts} restarts (max_restarts)"}
    return {
        "state": "forming",
        "attempt": job.attempt + 1,
        "members": [],
        "master": "",
        "world": 0,
        "restarts": job.restarts + 1,
        "error": why,
        "forming_deadline": now + job.request.wait_nodes_s,
    }
