"""deploy/grafana/sieve-dashboard.json queries only metrics the code emits, and shows every moderator metric.

Metric names come from the services' OpenTelemetry instruments, turned into the names Prometheus shows:
counters get `_total`, histograms `_bucket`, `_sum` and `_count`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from deploy_rules import ROOT, as_mapping

DASHBOARD = ROOT / "deploy" / "grafana" / "sieve-dashboard.json"
_INSTRUMENT = re.compile(
    r"create_(counter|up_down_counter|histogram|gauge|observable_gauge|observable_counter|observable_up_down_counter)"
    r"\(\s*\"(sieve_[a-z0-9_]+)\""
)
# Files whose every instrument needs a panel: the names there are kept in step with the dashboard.
METRICS_MODULES = ("services/moderator/metrics.py", "services/reviewer/metrics.py")
# Triton's own metrics (served on :8002), and Prometheus' `up`.
EXTERNAL_METRIC = re.compile(r"^(nv_[a-z0-9_]+|up)$")
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "by", "without", "histogram_quantile", "clamp_min", "le",
    "stage", "action", "error_kind", "partition", "model_version", "model", "version", "gpu_uuid", "job", "state",
}  # fmt: skip


def instruments() -> dict[str, str]:
    """Instrument name -> kind, for every OpenTelemetry instrument created in services/."""
    found: dict[str, str] = {}
    for path in (ROOT / "services").rglob("*.py"):
        for kind, name in _INSTRUMENT.findall(path.read_text()):
            found[name] = kind
    return found


def prometheus_names(name: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if "counter" in kind and "up_down" not in kind:
        return {name if name.endswith("_total") else f"{name}_total"}
    return {name}


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Identifiers used as series names: everything that is neither a PromQL word nor a label or string."""
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_ranges)
    without_numbers = re.sub(r"(?<![A-Za-z_])\d+(\.\d+)?([eE][-+]?\d+)?", "", without_groupings)
    words = set(re.findall(r"\$?[A-Za-z_][A-Za-z0-9_]*", without_numbers))
    return {w for w in words if not w.startswith("$") and w not in PROMQL_WORDS}


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = as_mapping(json.loads(DASHBOARD.read_text()))
    return dashboard


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    for expr in exprs(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_dashboard_queries_only_metrics_that_exist() -> None:
    emitted = {n for name, kind in instruments().items() for n in prometheus_names(name, kind)}
    assert "sieve_uploads_processed_total" in emitted, "the moderator's instruments were not found"
    unknown: dict[str, set[str]] = {}
    for expr in exprs(_dashboard()):
        bad = {m for m in metric_names(expr) if m not in emitted and not EXTERNAL_METRIC.match(m)}
        if bad:
            unknown[expr] = bad
    assert not unknown, f"queries on metrics no code emits: {unknown}"


def test_dashboard_shows_every_service_metric() -> None:
    shown = set().union(*(metric_names(e) for e in exprs(_dashboard())))
    moderator = (ROOT / METRICS_MODULES[0]).read_text()
    assert _INSTRUMENT.findall(moderator), f"no instruments found in {METRICS_MODULES[0]}"
    missing = []
    for module in METRICS_MODULES:
        path = ROOT / module
        assert path.exists(), f"{module} is gone: the dashboard's metrics must come from somewhere"
        for kind, name in _INSTRUMENT.findall(path.read_text()):
            if not prometheus_names(name, kind) & shown:
                missing.append(f"{module}: {name}")
    assert not missing, f"metrics without a panel: {missing}"


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, stage) (rate(sieve_stage_seconds_bucket{job=~"$job"}[5m])))'
    assert metric_names(expr) == {"sieve_stage_seconds_bucket"}
    assert metric_names("sum(rate(a_total[1m])) / clamp_min(sum(b), 1e-9) * 100") == {"a_total", "b"}
    assert prometheus_names("sieve_verdicts", "counter") == {"sieve_verdicts_total"}
