"""The PromQL of the Grafana dashboards, as Grafana would send it to Prometheus.

Shared by the expression check (tests/e2e/test_observability.py, promtool) and the run of
every panel's query against the in-cluster Prometheus (tests/e2e/test_cluster.py).
"""

from __future__ import annotations

import json
import re

from dtx_infra.kube import REPO_ROOT

DASHBOARDS = sorted((REPO_ROOT / "observability" / "dashboards").glob("*.json"))


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))
        for variable in board["templating"]["list"]:
            query = variable.get("query")
            if variable["type"] == "query" and isinstance(query, dict):
                found.append((f"{path.name}: variable {variable['name']}", query["query"]))
    return found


def as_promql(expr: str) -> str:
    """Grafana's macros and variables replaced the way Grafana does before querying."""
    for macro in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace(f"${{{macro}}}", "5m").replace(f"${macro}", "5m")
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".+", expr)
    # label_values(metric, label) is Grafana's, not PromQL: its metric selector is.
    match = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_][A-Za-z0-9_]*\)", expr.strip())
    return match.group(1) if match else expr
