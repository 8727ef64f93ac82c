"""``aimesh experiments show`` and ``aimesh feedback``: clients of the metrics service and the
events stream."""

from __future__ import annotations

import sys
import time

import msgspec

from aimesh.datasets_cmd import connect_once, exit_code
from shared import events
from shared.client import request
from shared.errors import MeshError
from shared.names import Names
from shared.schemas import ExperimentQuery, ExperimentReport, Feedback


def render_report(report: ExperimentReport) -> str:
    head = f"{report.model}  experiment {report.experiment or '-'}  state {report.state}  control v{report.control}"
    lines = [
        head,
        f"verdict: {report.verdict}" + (f" (v{report.winner})" if report.winner else "") + f": {report.reason}",
        f"sequential test: always-valid p-value, alpha {report.alpha:g}, at least {report.min_samples} rewards per "
        "variant before a verdict",
        "",
        f"  {'variant':<8} {'weight':>6} {'requests':>9} {'err %':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'rewards':>8} {'mean reward [95% CI]':>26} {'lift':>8} {'p':>7}  guardrail",
    ]
    for v in report.variants:
        ci = f"{v.reward_mean:.4f} [{v.reward_ci_low:.4f}, {v.reward_ci_high:.4f}]" if v.rewards else "-"
        lines.append(
            f"  v{v.version:<7} {v.weight:>6g} {v.requests:>9} {v.error_rate * 100:>6.2f} {v.p50_ms:>8.2f} "
            f"{v.p95_ms:>8.2f} {v.p99_ms:>8.2f} {v.rewards:>8} {ci:>26} {v.lift:>+8.4f} {v.p_value:>7.4f}  "
            f"{v.guardrail or '-'}"
        )
    return "\n".join(lines)


async def show(url: str, names: Names, model: str, as_json: bool) -> int:
    nc = await connect_once(url)
    try:
        report = await request(nc, names.experiments_query, ExperimentQuery(model=model), ExperimentReport)
    except MeshError as exc:
        print(f"aimesh experiments: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    print(msgspec.json.encode(report).decode() if as_json else render_report(report))
    return 0


async def feedback(url: str, names: Names, model: str, request_id: str, reward: float) -> int:
    nc = await connect_once(url)
    try:
        fb = events.check_feedback(Feedback(id=request_id, model=model, reward=reward, ts=time.time()))
        await events.publish_feedback(nc.jetstream(), names, fb)
    except MeshError as exc:
        print(f"aimesh feedback: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        await nc.close()
    print(f"{model}: reward {reward:g} recorded for request {request_id}")
    return 0
