"""The TransactionPolicy CRD schema agrees with services/dtx_runtime/policy.py.

Whatever the API server admits, the coordinators must accept, and the defaults must be
the same on both sides: the same field names, bounds, enums, patterns and defaults.
(The CEL rules are exercised against a real API server in tests/e2e/test_operator.py.)
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from dtx_runtime.policy import ParticipantPolicy, TransactionPolicy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "charts" / "dtx-crds" / "templates" / "transactionpolicy.yaml"
# Left unset in the schema (no default), so the object a user writes stays valid for
# either protocol; policy.py gives them their defaults.
PROTOCOL_SPECIFIC = {("timeouts", "prepareMs"), ("timeouts", "commitMs"), ("timeouts", "stepMs")}


def crd() -> dict[str, Any]:
    # The template's only Go-template lines are labels and the keep annotation.
    text = "\n".join(line for line in TEMPLATE.read_text().splitlines() if "{{" not in line)
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def version() -> dict[str, Any]:
    (only,) = crd()["spec"]["versions"]
    found: dict[str, Any] = only
    return found


def spec_schema() -> dict[str, Any]:
    found: dict[str, Any] = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return found


def _bounds(model: type[BaseModel], name: str) -> tuple[int | None, int | None]:
    ge = le = None
    for item in model.model_fields[name].metadata:
        if isinstance(item, annotated_types.Ge):
            ge = item.ge
        if isinstance(item, annotated_types.Le):
            le = item.le
    return ge, le  # type: ignore[return-value]


def _walk(model: type[BaseModel], schema: dict[str, Any], path: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        alias = field.alias or name
        yield (*path, alias), model, name, field, schema["properties"][alias]


def test_names_and_top_level() -> None:
    doc = crd()
    assert doc["metadata"]["name"] == "transactionpolicies.dtx.dev"
    names = doc["spec"]["names"]
    assert names["kind"] == "TransactionPolicy"
    assert names["plural"] == "transactionpolicies"
    assert names["shortNames"] == ["txp"]
    assert names["categories"] == ["dtx"]
    assert doc["spec"]["scope"] == "Namespaced"
    v = version()
    assert (v["name"], v["served"], v["storage"]) == ("v1alpha1", True, True)
    assert v["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in v["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Protocol",
        "MaxInFlight",
        "Ready",
        "Age",
    ]
    assert {"Coordinators", "Hash"} <= {n for n, c in columns.items() if c.get("priority") == 1}


def test_spec_fields_are_the_policy_fields_plus_selector() -> None:
    policy_fields = {f.alias or n for n, f in TransactionPolicy.model_fields.items()}
    assert set(spec_schema()["properties"]) == policy_fields | {"selector"}


def _check(model: type[BaseModel], schema: dict[str, Any], path: tuple[str, ...]) -> int:
    checked = 0
    own = set(schema["properties"]) - ({"selector"} if not path else set())
    assert own == {f.alias or n for n, f in model.model_fields.items()}
    for full, owner, name, field, prop in _walk(model, schema, path):
        annotation = field.annotation
        if isinstance(field.default, BaseModel):  # a nested section
            nested = type(field.default)
            assert prop["type"] == "object"
            dumped = field.default.model_dump(mode="json", by_alias=True)
            expected = {k: v for k, v in dumped.items() if (*full, k) not in PROTOCOL_SPECIFIC}
            assert prop["default"] == expected, full
            checked += _check(nested, prop, full)
            continue
        if full == ("participants",):
            items = prop["items"]
            assert prop["type"] == "array"
            assert "maxItems" in prop
            checked += _check(ParticipantPolicy, items, full)
            continue
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            assert prop["type"] == "string"
            assert prop["enum"] == [m.value for m in annotation], full
            assert prop["default"] == field.default.value, full
            assert "maxLength" in prop
        elif annotation is bool:
            assert prop["type"] == "boolean"
            assert prop["default"] == field.default
        elif annotation is str:
            assert prop["type"] == "string"
            (pattern,) = [m.pattern for m in field.metadata if hasattr(m, "pattern")]
            assert prop["pattern"] == pattern, full
            assert "maxLength" in prop
        else:  # integers: the same bounds, and the same default unless protocol-specific
            assert prop["type"] == "integer", full
            ge, le = _bounds(owner, name)
            assert (prop.get("minimum"), prop.get("maximum")) == (ge, le), full
            if full in PROTOCOL_SPECIFIC or field.default is None:
                assert "default" not in prop, full
            else:
                assert prop["default"] == field.default, full
        checked += 1
    return checked


def test_bounds_defaults_enums_and_patterns_match_policy_py() -> None:
    assert _check(TransactionPolicy, spec_schema(), ()) == 19  # every leaf field


def test_every_string_is_bounded_and_every_list_capped() -> None:
    def visit(schema: dict[str, Any], path: str) -> None:
        kind = schema.get("type")
        if kind == "string":
            assert "maxLength" in schema or "enum" in schema, path
        if kind == "array":
            assert "maxItems" in schema, path
            visit(schema["items"], f"{path}[]")
        if kind == "integer":
            assert "minimum" in schema, path
        for name, sub in (schema.get("properties") or {}).items():
            visit(sub, f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            visit(extra, f"{path}.*")

    visit(spec_schema(), "spec")
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]
    visit(status, "status")


def test_cross_field_rules_are_there() -> None:
    def messages(schema: dict[str, Any]) -> list[str]:
        return [v["message"] for v in schema.get("x-kubernetes-validations", [])]

    spec = spec_schema()
    props = spec["properties"]
    assert "timeouts.stepMs applies only to protocol Saga" in messages(spec)
    assert any("prepareMs" in m and "TwoPhaseCommit" in m for m in messages(spec))
    assert any("prepareMs must be below" in m for m in messages(props["timeouts"]))
    assert any("stepMs must be below" in m for m in messages(props["timeouts"]))
    assert "retries.backoffInitialMs must be at most retries.backoffMaxMs" in messages(
        props["retries"]
    )
    participants = props["participants"]
    assert participants["x-kubernetes-list-type"] == "map"
    assert participants["x-kubernetes-list-map-keys"] == ["name"]
    assert "participants must have unique names" in messages(participants)
