"""The worker's alerts and Grafana dashboard (deploy/k8s/components/monitoring), checked
offline.

The alerts: the PrometheusRule as an overlay renders it, its rule groups checked by promtool
(`check rules`, lint fatal) and unit-tested by it (`test rules`, tests/deploy/alerts-test.yaml:
series in, the alerts that fire out), each alert's test shown to fail when its expression
never fires; every metric they read exists, each alert has a severity, a summary, a
description and a runbook section in docs/operations.md. The dashboard: loaded, every PromQL
expression parsed by promtool (as a recording rule, Grafana's variables substituted), every
metric it reads registered by WorkerMetrics (or listed below from kube-state-metrics), every
metric the worker registers on some panel, the data source and the namespace and pod
templated, panel ids unique and the layout free of overlaps. promtool is built from its Go
module on first use (deploy/manifests.py); without Go the tests fail and say what to install.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.ops.metrics import WorkerMetrics
from deploy import manifests
from tests.deploy.test_manifests import PROFILES

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "k8s" / "components" / "monitoring"
DASHBOARD = MONITORING / "emotion-worker-dashboard.json"
ALERT_TESTS = Path(__file__).with_name("alerts-test.yaml")
OPERATIONS = REPO / "docs" / "operations.md"
# Metrics of other exporters that the alerts and the dashboard read.
KUBE_STATE_METRICS = {"kube_pod_container_status_restarts_total"}
SEVERITIES = {"warning", "critical"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables -> what they stand for in a query Prometheus would run.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "6h",
    "$namespace": ".*",
    "$pod": ".*",
}
# The last-applied-configuration annotation of `kubectl apply` holds at most 256 KiB.
MAX_CONFIGMAP_BYTES = 200 * 1024
PROMTOOL_TIMEOUT_S = 1800  # the first test to need promtool builds it (a few minutes)
# PromQL's own words, which look like metric names to the scan below.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
PROMQL_WORDS |= {"by", "without", "on", "ignoring", "group_left", "group_right"}


# ----------------------------------------------------------------------------- helpers


def worker_metric_names() -> dict[str, set[str]]:
    """Each metric WorkerMetrics registers -> the sample names Prometheus scrapes of it."""
    names: dict[str, set[str]] = {}
    for family in WorkerMetrics().registry.collect():
        if family.type == "counter":
            names[family.name] = {family.name + "_total"}
        elif family.type == "histogram":
            names[family.name] = {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names[family.name] = {family.name}
    return names


def known_names() -> set[str]:
    return set().union(*worker_metric_names().values()) | KUBE_STATE_METRICS


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, label lists and function names are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers of each use of metric `name` in `expr` ("" where it has none)."""
    return [
        m.group(1) or ""
        for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])\s*(?:\{{([^{{}}]*)\}})?", expr)
    ]


def _of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _monitored() -> list[str]:
    """Overlays scraped by the Prometheus Operator: they carry the alerts and the dashboard."""
    return sorted(name for name, p in PROFILES.items() if p.scrape == "servicemonitor")


def _rule(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (rule,) = _of_kind(objs, "PrometheusRule")
    return rule


def _alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def _write_rules(folder: Path, groups: list[dict[str, Any]]) -> None:
    """The rule groups as a Prometheus rule file, and the unit tests pointed at it."""
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    tests["rule_files"] = ["rules.yaml"]
    (folder / "alerts-test.yaml").write_text(yaml.safe_dump(tests), encoding="utf-8")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.fixture(params=_monitored())
def monitored(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> Any:
    return rendered[request.param]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            )
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: {query}"
            out.append((f"variable {var['name']}", match.group(1)))
    return out


# ----------------------------------------------------------------------------- the scan


def test_metric_name_scan_finds_names_and_only_names() -> None:
    """The checks below rest on it: it must see a misspelt name, and no false ones."""
    expr = (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(emotion_worker_queue_wait_seconds_bucket{pod=~"$pod"}[5m])))'
        " / on (namespace) group_left sum without (pod) (emotion_worker_readyy offset 5m) > 1e3"
        ' and deriv(sum(x:y)[15m:1m]) unless vector(1) or label_replace(up, "a", "$1", "b", "(.*)")'
    )
    assert metric_names(expr) == {
        "emotion_worker_queue_wait_seconds_bucket",
        "emotion_worker_readyy",
        "x:y",
        "up",
    }
    assert "emotion_worker_readyy" not in known_names()


# ------------------------------------------------------------------------------ alerts


def test_only_operator_overlays_carry_the_alerts_and_the_dashboard(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name in PROFILES:
        objs = rendered[name]
        rules = _of_kind(objs, "PrometheusRule")
        boards = [
            m
            for m in _of_kind(objs, "ConfigMap")
            if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        ]
        expected = name in _monitored()
        assert bool(rules) == expected and bool(boards) == expected, name
    assert not _of_kind(rendered["base"], "PrometheusRule")


@pytest.mark.timeout(PROMTOOL_TIMEOUT_S)
def test_promtool_accepts_the_rules(monitored: Any, promtool: Path, tmp_path: Path) -> None:
    _write_rules(tmp_path, _rule(monitored)["spec"]["groups"])
    done = _promtool(
        promtool, "check", "rules", "--lint=all", "--lint-fatal", "rules.yaml", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(PROMTOOL_TIMEOUT_S)
def test_alert_unit_tests_pass(monitored: Any, promtool: Path, tmp_path: Path) -> None:
    _write_rules(tmp_path, _rule(monitored)["spec"]["groups"])
    done = _promtool(promtool, "test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(PROMTOOL_TIMEOUT_S)
def test_every_alert_has_a_unit_test_that_needs_its_expression(
    monitored: Any, promtool: Path, tmp_path: Path
) -> None:
    """Each alert is tested, and its tests fail when its expression never fires: a wrong
    expression (wrong metric, label or threshold) would not pass them."""
    rule = _rule(monitored)
    names = {a["alert"] for a in _alerts(rule)}
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert tested == names
    for name in sorted(names):
        groups = json.loads(json.dumps(rule["spec"]["groups"]))
        for alert in (r for g in groups for r in g["rules"] if r.get("alert") == name):
            alert["expr"] = "vector(1) < 0"
        _write_rules(tmp_path, groups)
        done = _promtool(promtool, "test", "rules", "alerts-test.yaml", cwd=tmp_path)
        assert done.returncode != 0 and f"alertname: {name}" in done.stdout + done.stderr, (
            f"{name}: the unit tests pass even when it never fires"
        )


def test_alerts_read_only_metrics_that_exist(monitored: Any) -> None:
    known = known_names()
    for alert in _alerts(_rule(monitored)):
        names = metric_names(alert["expr"])
        assert names, alert["alert"]
        assert names <= known, f"{alert['alert']}: no such metric {names - known}"


def test_alerts_say_how_bad_what_and_where_the_runbook_is(monitored: Any) -> None:
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    alerts = _alerts(_rule(monitored))
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"EmotionWorker[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("/docs/operations.md"), notes["runbook_url"]
        assert anchor == name.lower() and anchor in anchors, (
            f"{name}: docs/operations.md has no section '{name}' (#{anchor})"
        )


def test_lag_alert_threshold_is_the_scalers(monitored: Any) -> None:
    """EmotionWorkerLagGrowing's floor is one replica's tolerated backlog: KEDA's threshold."""
    (scaled,) = _of_kind(monitored, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    threshold = int(trigger["metadata"]["lagThreshold"])
    (alert,) = [a for a in _alerts(_rule(monitored)) if a["alert"] == "EmotionWorkerLagGrowing"]
    floors = re.findall(r"\(emotion_worker_consumer_lag\)\s*>\s*(\d+)", alert["expr"])
    assert floors == [str(threshold)], alert["expr"]
    assert f"({threshold})" in alert["annotations"]["description"]


# --------------------------------------------------------------------------- dashboard


def test_dashboard_configmap_is_the_file_for_the_grafana_sidecar(monitored: Any) -> None:
    (board,) = [
        m
        for m in _of_kind(monitored, "ConfigMap")
        if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    # A fixed name: hashed names would pile up under `kubectl apply`, one uid each.
    assert board["metadata"]["name"] == "emotion-worker-dashboard"
    ((key, text),) = board["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert len(text.encode()) < MAX_CONFIGMAP_BYTES


def test_dashboard_is_templated_on_datasource_namespace_and_pod(dashboard: dict[str, Any]) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    assert variables["pod"]["includeAll"] and variables["pod"]["allValue"] == ".*"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    # Every series a panel reads is narrowed to the chosen namespace and pods.
    for where, expr in _queries(dashboard):
        if where.startswith("variable"):
            continue
        for name in metric_names(expr):
            for matchers in selectors(expr, name):
                assert 'namespace=~"$namespace"' in matchers, f"{where}: {name}"
                assert 'pod=~"$pod"' in matchers, f"{where}: {name}"


def test_dashboard_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_reads_only_metrics_that_exist(dashboard: dict[str, Any]) -> None:
    known = known_names()
    for where, expr in _queries(dashboard):
        names = metric_names(expr)
        assert names, where
        assert names <= known, f"{where}: no such metric {names - known}"


def test_dashboard_shows_every_worker_metric(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for _, expr in _queries(dashboard)))
    missing = [name for name, samples in worker_metric_names().items() if not samples & used]
    assert not missing, f"metrics on no panel: {missing}"
    assert used >= KUBE_STATE_METRICS


@pytest.mark.timeout(PROMTOOL_TIMEOUT_S)
def test_promtool_parses_every_dashboard_query(
    dashboard: dict[str, Any], promtool: Path, tmp_path: Path
) -> None:
    """Each query as Prometheus would get it (Grafana's variables filled in), as a recording
    rule: `promtool check rules` parses its PromQL."""
    rules = []
    for i, (where, expr) in enumerate(_queries(dashboard)):
        for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool(promtool, "check", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(PROMTOOL_TIMEOUT_S)
def test_promtool_is_the_pinned_version(promtool: Path) -> None:
    done = subprocess.run(
        [str(promtool), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert f"version {manifests.PROMTOOL_VERSION}" in done.stdout + done.stderr
