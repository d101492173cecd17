"""Reading a trace back from Jaeger's api_v3 (OTLP JSON), for the trace tests on loopback
(tests/e2e/test_observability.py) and on the node (tests/e2e/test_cluster.py)."""

from __future__ import annotations

from typing import Any


def spans_by_service(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """service.name -> spans, from OTLP JSON (resourceSpans, as Jaeger's api_v3 returns)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for batch in trace.get("resourceSpans") or []:
        attributes = {a["key"]: a["value"] for a in batch["resource"].get("attributes", [])}
        service = attributes.get("service.name", {}).get("stringValue", "?")
        for scope in batch.get("scopeSpans") or []:
            found.setdefault(service, []).extend(scope.get("spans", []))
    return found
