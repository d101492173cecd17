"""charts/dtx's description of each service agrees with the code it deploys.

The chart's loop over ``services`` is driven by facts in values.yaml (database, kafka,
policy, participant, calls, rest). These tests read the same facts from the code: the
local wiring (services/dtx_cli/system.py), each service's settings type and main module,
so a service that starts calling another, or gets a database, fails here instead of in a
cluster (where a missing endpoint falls back to 127.0.0.1 and a NetworkPolicy drops the
call). The operator's RBAC is k8s/operator/rbac.yaml's, rule for rule.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from dtx_cli.serve import SERVICES, load_service
from dtx_cli.system import PARTICIPANTS, WITH_DATABASE
from dtx_runtime.coordination.settings import CoordinationSettings
from dtx_runtime.settings import ServiceSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dtx"


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = values()["services"][name]
    return found


def endpoint_settings(name: str) -> set[str]:
    """The services whose ``DTX_<X>_ENDPOINT`` the service reads (not OTLP's: telemetry)."""
    fields = set(load_service(name).settings_type.model_fields) - set(ServiceSettings.model_fields)
    return {f.removesuffix("_endpoint") for f in fields if f.endswith("_endpoint")}


def test_the_chart_deploys_every_service_dtx_serve_knows() -> None:
    assert set(values()["services"]) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_database_and_participant_as_in_the_local_wiring(name: str) -> None:
    svc = service(name)
    assert svc["database"] is (name in WITH_DATABASE)
    assert svc["participant"] is (name in PARTICIPANTS)


@pytest.mark.parametrize("name", SERVICES)
def test_policy_services_are_the_coordinators(name: str) -> None:
    """policy: true mounts DTX_POLICY_FILE and sets DTX_PARTICIPANTS: coordinator settings."""
    settings_type = load_service(name).settings_type
    assert service(name)["policy"] is issubclass(settings_type, CoordinationSettings)


@pytest.mark.parametrize("name", SERVICES)
def test_calls_are_the_endpoints_the_service_reads(name: str) -> None:
    """The chart sets DTX_<X>_ENDPOINT for X in calls (and NetworkPolicy allows exactly those)."""
    calls = set(service(name)["calls"])
    reads = endpoint_settings(name)
    assert reads <= calls, f"{name} reads endpoints the chart does not set: {reads - calls}"
    if service(name)["policy"]:
        reads |= set(PARTICIPANTS)  # DTX_PARTICIPANTS
    assert calls <= reads, f"{name} is allowed to call services it never reads: {calls - reads}"


@pytest.mark.parametrize("name", SERVICES)
def test_kafka_where_the_service_uses_it(name: str) -> None:
    source = inspect.getsource(inspect.getmodule(load_service(name).setup))  # type: ignore[arg-type]
    uses_kafka = "wire_outbox" in source or "kafka_bootstrap" in source
    assert service(name)["kafka"] is uses_kafka


@pytest.mark.parametrize("name", SERVICES)
def test_rest_only_for_the_gateway(name: str) -> None:
    fields = load_service(name).settings_type.model_fields
    assert service(name)["rest"]["enabled"] is ("gateway_port" in fields)
    if "gateway_port" in fields:
        assert service(name)["rest"]["port"] == fields["gateway_port"].default


def test_every_call_has_a_callee_in_the_chart() -> None:
    for name in SERVICES:
        assert set(service(name)["calls"]) <= set(SERVICES) - {name}, name


def test_operator_rules_are_rbac_yaml_rules() -> None:
    documents = list(yaml.safe_load_all((ROOT / "k8s" / "operator" / "rbac.yaml").read_text()))
    [cluster_role] = [d for d in documents if d and d["kind"] == "ClusterRole"]
    chart_rules = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
    assert chart_rules == cluster_role["rules"]


def test_policy_spec_schema_is_the_crds() -> None:
    """values.schema.json's defaultPolicy.spec: the CRD's spec schema less selector, rules and
    defaults, with additionalProperties: false on every object (so a typo fails at template
    time, not at install)."""
    import json
    import re

    crd_text = (ROOT / "charts" / "dtx-crds" / "templates" / "transactionpolicy.yaml").read_text()
    # The template's only actions are in metadata; blank them out to read the YAML.
    crd_text = re.sub(r"^.*\{\{.*$\n?", "", crd_text, flags=re.MULTILINE)
    crd = yaml.safe_load(crd_text)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            out = {
                k: convert(v)
                for k, v in node.items()
                if not k.startswith("x-kubernetes-") and k not in ("default", "description")
            }
            if out.get("type") == "object" and "properties" in out:
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    expected = convert(spec)
    del expected["properties"]["selector"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    actual = schema["properties"]["defaultPolicy"]["properties"]["spec"]
    actual = {k: v for k, v in actual.items() if k != "description"}
    assert actual == expected
