"""The Grafana dashboards in observability/dashboards: valid, complete, and wired to the
provisioned data sources.

That every expression parses as PromQL and every metric exists in what the services
export is checked with promtool and a running system in tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "observability" / "dashboards").glob("*.json"))

# What the brief of each dashboard promised, by metric: every one must be shown somewhere.
REQUIRED_METRICS = {
    "dtx_transactions_total",
    "dtx_transaction_phase_seconds_bucket",
    "dtx_saga_step_seconds_bucket",
    "dtx_transactions_in_doubt",
    "dtx_transactions_needs_intervention",
    "dtx_transaction_oldest_unfinished_age_seconds",
    "dtx_saga_compensations_total",
    "dtx_outbox_backlog",
    "dtx_outbox_oldest_unsent_age_seconds",
    "dtx_consumer_lag",
    "dtx_grpc_server_handled_total",
    "dtx_grpc_server_handling_seconds_bucket",
    "dtx_http_requests_total",
    "dtx_http_request_seconds_bucket",
}


def load(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(path.read_text())
    return found


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return out


def expressions() -> list[str]:
    return [
        target["expr"]
        for path in DASHBOARDS
        for panel in panels(load(path))
        for target in panel.get("targets", [])
    ]


def test_there_are_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} >= {"dtx-transactions.json", "dtx-services.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_grafana_json(path: Path) -> None:
    board = load(path)
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        assert key in board, key
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"])
    assert "id" not in board or board["id"] is None, "provisioned dashboards carry no database id"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["y"] >= 0, panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_query_on_the_prometheus_variable(path: Path) -> None:
    board = load(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["title"], panel
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r}: empty query"
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_variables_used_are_defined(path: Path) -> None:
    board = load(path)
    defined = {v["name"] for v in board["templating"]["list"]}
    text = json.dumps(board["panels"])
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    builtin = {"__rate_interval", "__interval", "__range", "__all"}
    assert used - builtin <= defined, used - builtin - defined


def test_every_required_metric_is_on_a_dashboard() -> None:
    used = {m for e in expressions() for m in re.findall(r"\bdtx_[a-z0-9_]+", e)}
    assert used >= REQUIRED_METRICS, REQUIRED_METRICS - used


def test_dashboard_uids_are_unique_and_match_the_chart() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))
    chart = (ROOT / "observability" / "chart" / "dashboards").resolve()
    assert chart == (ROOT / "observability" / "dashboards").resolve(), (
        "the chart provisions the dashboards of observability/dashboards"
    )
