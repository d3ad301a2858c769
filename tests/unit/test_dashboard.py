"""The Grafana dashboard and its provisioning (docker/grafana/): valid for Grafana's file provisioning, wired to
the provisioned Prometheus datasource, querying only DESIGN's contract metric names (and all of them), and
described in README.

The helpers here (contract names, the names a dashboard query uses) are shared with
tests/integration/test_deploy.py, which checks them against a real /metrics and a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "moeserve.json"
DATASOURCES = REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "moeserve.yaml"
COMPOSE = REPO / "docker" / "compose.yaml"

METRIC_NAME = re.compile(r"moeserve:[a-zA-Z0-9_:]+")
HISTOGRAM_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def contract_metrics() -> dict[str, str]:
    """DESIGN's metric contract: name -> kind ("histogram" or "metric"), read from the Metrics bullet."""
    design = (REPO / "docs" / "DESIGN.md").read_text()
    bullet = re.search(r"^- Metrics \(prometheus-client\):(.*?)(?=^\S|^- )", design, re.MULTILINE | re.DOTALL)
    assert bullet, "docs/DESIGN.md has no '- Metrics (prometheus-client):' contract bullet"
    text = bullet.group(1)
    kinds = {}
    for match in re.finditer(r"`(moeserve:[a-z0-9_]+)(?:\{[a-z_]+\})?`( \(histogram\)|)", text):
        kinds[match.group(1)] = "histogram" if match.group(2) else "metric"
    for name in re.findall(r"`(moeserve:[a-z0-9_]+)`", text.split("histograms", 1)[1].split("; expert metrics")[0]):
        kinds[name] = "histogram"
    return kinds


def contract_name_of(series: str, contract: dict[str, str]) -> str | None:
    """The contract metric a series name belongs to (a histogram's _bucket/_sum/_count included), or None."""
    if series in contract:
        return series
    for suffix in HISTOGRAM_SERIES_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and contract.get(base) == "histogram":
            return base
    return None


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict) -> list[dict]:
    """Every panel that queries (rows excluded, panels nested in collapsed rows included)."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in graph_panels(dashboard) for target in panel["targets"]]


def dashboard_series_names(dashboard: dict) -> set[str]:
    """The metric (series) names the dashboard's PromQL queries select."""
    return {name for expr in dashboard_queries(dashboard) for name in METRIC_NAME.findall(expr)}


def test_contract_parser_reads_designs_metric_names() -> None:
    contract = contract_metrics()
    assert len(contract) == 21
    assert contract["moeserve:request_success_total"] == "metric"
    assert contract["moeserve:time_to_first_token_seconds"] == "histogram"
    assert contract["moeserve:expert_stall_seconds"] == "histogram"
    assert contract["moeserve:expert_cache_bytes"] == "metric"
    assert contract_name_of("moeserve:expert_stall_seconds_bucket", contract) == "moeserve:expert_stall_seconds"
    assert contract_name_of("moeserve:prompt_tokens_total_sum", contract) is None


def test_dashboard_is_valid_for_grafana_file_provisioning() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "moeserve" and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] == "moeserve"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns the database id
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(panel_id, int) for panel_id in ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert panel["title"] and grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert "targets" not in panel, panel["title"]
    datasource_uid = _provisioned_datasource()["uid"]
    panels = graph_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        assert panel["type"] in {"timeseries", "heatmap", "stat", "gauge"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_has_the_issues_panels() -> None:
    titles = {panel["title"]: panel for panel in graph_panels(load_dashboard())}
    for title in ("Request rate", "Time to first token", "Inter-token latency", "End-to-end latency",
                  "Token throughput", "Running and waiting requests", "KV-cache usage",
                  "Prefetch issued, used, wasted", "Expert bytes read per tier", "Expert stall time",
                  "Trace-store size"):
        assert title in titles
    heatmap = titles["Expert-cache hit rate per layer"]
    assert heatmap["type"] == "heatmap" and heatmap["options"]["calculate"] is False
    assert [target["legendFormat"] for target in heatmap["targets"]] == ["{{layer}}"]
    assert "by (layer)" in heatmap["targets"][0]["expr"]
    for title in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        exprs = [target["expr"] for target in titles[title]["targets"]]
        assert [expr.split(",")[0] for expr in exprs] == [f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")]


def test_dashboard_queries_exactly_the_contract_metrics() -> None:
    """Every series name a query uses belongs to DESIGN's contract, and every contract metric has a panel."""
    contract = contract_metrics()
    names = dashboard_series_names(load_dashboard())
    assert sorted(name for name in names if contract_name_of(name, contract) is None) == []
    assert {contract_name_of(name, contract) for name in names} == set(contract)
    for name in names:
        if contract.get(name) == "histogram":
            raise AssertionError(f"{name} is a histogram: query its _bucket, _sum or _count series")


def test_provisioning_points_at_the_compose_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana_volumes = compose["services"]["grafana"]["volumes"]
    datasource = _provisioned_datasource()
    assert datasource["type"] == "prometheus" and datasource["access"] == "proxy" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_volumes
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_readme_explains_every_panel() -> None:
    readme = (REPO / "README.md").read_text()
    assert [panel["title"] for panel in graph_panels(load_dashboard()) if f"| {panel['title']} |" not in readme] == []


def _provisioned_datasource() -> dict:
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    return datasource
