"""The deploy/ files stay valid and in step with the metrics service.

Prometheus must accept the scrape config, and every query of the Grafana dashboard may name only
series (and labels) the metrics service exports: a series renamed in the code then breaks this
test instead of a dashboard panel, silently. ``SERIES`` is the contract; a test checks that the
renderer declares every family in it.

The checks that need ``promtool`` (Debian's prometheus package) skip without it, and fail
without it in CI (``CI`` set).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.metrics.prometheus import MeshView, render
from tests.helpers import require_binary

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "aimesh-dashboard.json"

_ENDPOINT = frozenset({"service", "instance", "endpoint", "model", "version"})
_GATEWAY = frozenset({"instance", "model", "version"})
_PROCESS = frozenset({"service", "instance"})
_EXPERIMENT = frozenset({"model", "variant"})
_TRAIN = frozenset({"job", "model"})
# Series the dashboard may query, with their labels (see services/metrics/prometheus.py).
SERIES: dict[str, frozenset[str]] = {
    "aimesh_gateway_requests_total": _GATEWAY,
    "aimesh_gateway_errors_total": _GATEWAY | {"code"},
    "aimesh_gateway_request_duration_seconds_bucket": _GATEWAY | {"le"},
    "aimesh_requests_total": _ENDPOINT,
    "aimesh_errors_total": _ENDPOINT,
    "aimesh_request_duration_seconds_bucket": _ENDPOINT | {"le"},
    "aimesh_in_flight": _ENDPOINT,
    "aimesh_queued": _ENDPOINT,
    "aimesh_batch_size_bucket": _ENDPOINT | {"le"},  # an inference actor's model/version too
    "aimesh_batches_total": _ENDPOINT | {"reason"},
    "aimesh_queue_lag": frozenset({"stream", "consumer"}),
    "aimesh_replicas": frozenset({"pool"}),
    "aimesh_replicas_desired": frozenset({"pool"}),
    "aimesh_up": _PROCESS,
    "aimesh_process_cpu_seconds_total": _PROCESS,
    "aimesh_process_resident_memory_bytes": _PROCESS,
    "aimesh_gpu_utilization_ratio": _PROCESS | {"gpu"},
    "aimesh_gpu_memory_used_bytes": _PROCESS | {"gpu"},
    "aimesh_train_loss": _TRAIN,
    "aimesh_train_samples_per_second": _TRAIN,
    "aimesh_experiment_reward_mean": _EXPERIMENT,
    "aimesh_experiment_p_value": _EXPERIMENT,
    "aimesh_experiment_requests": _EXPERIMENT,
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"})
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series, labels) an expression names. Not a PromQL parser: enough for the dashboard's
    queries, whose syntax promtool checks separately."""
    expr = _STRING.sub('""', expr)
    labels = {m for block in _MATCHERS.findall(expr) for m in _MATCHER_LABEL.findall(block)}
    expr = _RANGE.sub("", _MATCHERS.sub(" ", expr))
    labels |= {g.strip() for clause in _GROUPING.findall(expr) for g in clause.split(",") if g.strip()}
    expr = _GROUPING.sub(" ", expr)
    series = set()
    for match in _IDENT.finditer(expr):
        name = match.group(0)
        if match.group(1) or name in _KEYWORDS or expr[: match.start()].endswith("$"):
            continue  # a function or aggregation, a keyword, a Grafana variable
        series.add(name)
    return series, labels


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets(node: Any) -> Iterator[dict[str, Any]]:
    """Every query target of every panel, rows' nested panels included."""
    if isinstance(node, dict):
        if "expr" in node:
            yield node
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


def test_the_renderer_declares_every_series_the_dashboard_may_use() -> None:
    declared = set(re.findall(r"^# TYPE (\w+) (\w+)$", render(MeshView()), re.M))
    families = {name: kind for name, kind in declared}
    for series in SERIES:
        family = series.removesuffix("_bucket")
        assert family in families, f"{family} is not rendered by services/metrics/prometheus.py"
        if series.endswith("_bucket"):
            assert families[family] == "histogram", series


def test_promql_names_finds_series_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(aimesh_x_bucket{model=~"$model",a="}"}[$__rate_interval])))'
        " / on (model) group_left sum(aimesh_y) without (b) > bool 0"
    )
    assert promql_names(expr) == ({"aimesh_x_bucket", "aimesh_y"}, {"model", "le", "a", "b"})


def test_every_dashboard_query_names_only_exported_series_and_their_labels() -> None:
    found = list(targets(dashboard()["panels"]))
    assert len(found) >= 20
    used: set[str] = set()
    for target in found:
        expr = target["expr"]
        series, labels = promql_names(expr)
        assert series, f"no series in {expr!r}"
        unknown = series - SERIES.keys()
        assert not unknown, f"{sorted(unknown)} in {expr!r}: not a series of the metrics service ({sorted(SERIES)})"
        allowed = set().union(*(SERIES[s] for s in series))
        labels |= set(_LEGEND.findall(target.get("legendFormat", "")))
        assert labels <= allowed, (
            f"labels {sorted(labels - allowed)} in {expr!r}: {sorted(series)} have {sorted(allowed)}"
        )
        used |= series
    assert used == SERIES.keys(), f"no panel for {sorted(SERIES.keys() - used)}"


def test_dashboard_is_portable_and_filters_by_model() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 38
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"
            match = _LABEL_VALUES.fullmatch(var["definition"])
            assert match, var["definition"]
            assert match.group(2) in SERIES[match.group(1)], var["definition"]
    assert "model" in variables
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool checks the expressions as recording rules, Grafana's variables replaced."""
    promtool = require_binary("promtool")
    rules = [
        {
            "record": f"aimesh_dashboard:query_{i}",
            "expr": t["expr"].replace("$__rate_interval", "1m").replace("$model", ".*").replace("$service", ".*"),
        }
        for i, t in enumerate(targets(dashboard()["panels"]))
    ]
    assert not any("$" in r["expr"] for r in rules), [r["expr"] for r in rules if "$" in r["expr"]]
    path = tmp_path / "dashboard.rules.json"  # JSON is YAML: no YAML library needed
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_is_valid_and_keeps_the_exposed_labels() -> None:
    text = PROMETHEUS_CONFIG.read_text()
    assert "job_name: aimesh" in text and '"metrics:9464"' in text and "scrape_interval: 5s" in text
    # Without it the exposition's instance/job labels become exported_instance/exported_job.
    assert "honor_labels: true" in text
    promtool = require_binary("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
