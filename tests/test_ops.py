"""The shipped Grafana dashboard and Prometheus alert rules (``ops/``): well formed, every query valid PromQL
(parsed by ``promql-parser``, the Rust PromQL parser; no ``promtool`` binary is packaged for pip or npm), every
metric a query names exported (by the service, `serve.metrics.exported_series`, or by the batch jobs,
`ecgad.ray.metrics.JOB_COUNTERS`), and every exported metric shown or alerted on somewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml

from ecgad.ray.metrics import JOB_COUNTERS
from serve.metrics import EXPORTED_PREFIX, exported_series

OPS = Path(__file__).resolve().parents[1] / "ops"
#: Grafana's interval variables are not PromQL; any duration stands in for them when parsing.
GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)")
#: Prometheus durations as rules write ``for``.
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def exported() -> dict[str, str]:
    """Every series the service and the batch jobs export, with its type."""
    return {**exported_series(), **{EXPORTED_PREFIX + name: "counter" for name in JOB_COUNTERS}}


def dashboard() -> dict:
    return json.loads((OPS / "grafana-dashboard.json").read_text())


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((OPS / "alerts.yaml").read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names the PromQL ``expr`` selects (raises on a syntax error)."""
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            return
        for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attribute, None)
            if child is not None:
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(GRAFANA_VARIABLES.sub("5m", expr)))
    return names


def test_dashboard_is_an_importable_grafana_dashboard():
    data = dashboard()
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in data["panels"]:
        assert panel["title"] and panel["type"] in {"timeseries", "heatmap", "stat", "gauge"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    assert {v["name"] for v in data["templating"]["list"]} >= {"datasource"}


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] and rule["annotations"]["summary"]
    assert {"EcgadServerErrors", "EcgadOverloaded", "EcgadSlowAnswers", "EcgadModelQueueDeep",
            "EcgadScoreDrift"} <= set(names), "error rate, 503 rate, p99 latency, queue depth and drift are alerted"


@pytest.mark.parametrize("expr", dashboard_queries() + [rule["expr"] for rule in alert_rules()])
def test_every_query_is_promql_naming_exported_metrics(expr):
    names = metric_names(expr)
    assert names, f"the query selects no metric: {expr}"
    assert names <= set(exported()), f"not exported by the service or the jobs: {names - set(exported())}"


def test_every_exported_metric_is_watched():
    """A metric nobody shows or alerts on is a metric nobody reads."""
    queried = {name for expr in dashboard_queries() + [r["expr"] for r in alert_rules()] for name in metric_names(expr)}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in queried}
    declared = {re.sub(r"_(bucket|count|sum)$", "", name) if kind == "histogram" else name
                for name, kind in exported().items()}
    assert declared - families == set()
    assert all(name.startswith(EXPORTED_PREFIX + "ecgad_") for name in declared)
