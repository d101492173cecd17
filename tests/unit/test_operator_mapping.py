"""The operator's pure mapping: spec to policy file and ConfigMap, the hash, the status."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from dtx_operator import mapping
from dtx_operator.mapping import Applied, Observation
from dtx_runtime import ConfigError
from dtx_runtime.policy import Protocol, TransactionPolicy, parse_policy

pytestmark = pytest.mark.unit

# A spec as the API server stores it: the CRD's defaults filled in, plus the selector.
SPEC: dict[str, Any] = {
    "selector": {"matchLabels": {"app.kubernetes.io/name": "coordinator"}},
    "protocol": "TwoPhaseCommit",
    "participants": [
        {"name": "payments", "endpoint": "payments.dtx.svc:50051", "timeoutMs": 750},
        {"name": "inventory", "endpoint": "inventory.dtx.svc:50051"},
    ],
    "timeouts": {"prepareMs": 1500, "commitMs": 2500, "transactionMs": 20000},
    "retries": {
        "maxAttempts": 6,
        "backoffInitialMs": 100,
        "backoffMaxMs": 3000,
        "backoffMultiplierPercent": 150,
        "jitterPercent": 10,
    },
    "maxInFlight": 64,
    "recovery": {
        "intervalMs": 500,
        "inDoubtThresholdMs": 4000,
        "maxAttempts": 20,
        "onExhausted": "Abort",
    },
    "suspend": True,
}

T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
APPLIED = Applied(True, "ConfigMapWritten", "ConfigMap demo-policy holds policy abc")


# -- the file and the hash ---------------------------------------------------------------


def test_file_round_trips_through_the_coordinators_parser() -> None:
    rendered = mapping.render_policy(SPEC)
    without_selector = {k: v for k, v in SPEC.items() if k != "selector"}

    assert "selector" not in json.loads(rendered.text)
    assert json.loads(rendered.text) == without_selector
    assert parse_policy(rendered.text) == TransactionPolicy.model_validate(without_selector)
    assert parse_policy(rendered.text) == rendered.policy
    assert rendered.policy.protocol is Protocol.TWO_PHASE_COMMIT
    assert rendered.policy.timeout_of("payments", 2000) == 0.75
    assert rendered.policy.suspend is True


def test_hash_is_the_coordinators_digest() -> None:
    rendered = mapping.render_policy(SPEC)
    assert rendered.hash == parse_policy(rendered.text).digest()
    assert rendered.hash == rendered.policy.digest()
    # the selector is not part of the policy: changing it keeps the hash
    other = {**SPEC, "selector": {"matchLabels": {"app": "other"}}}
    assert mapping.render_policy(other).hash == rendered.hash
    # a behaviour change changes it
    assert mapping.render_policy({**SPEC, "suspend": False}).hash != rendered.hash


def test_file_is_deterministic() -> None:
    reordered = dict(reversed(list(SPEC.items())))
    reordered["retries"] = dict(reversed(list(SPEC["retries"].items())))
    assert mapping.render_policy(reordered).text == mapping.render_policy(SPEC).text


def test_minimal_spec_gets_policy_defaults() -> None:
    # what the API server stores for `spec: {}` (protocol-specific timeouts unset)
    stored = {
        "protocol": "TwoPhaseCommit",
        "timeouts": {"transactionMs": 10000},
        "maxInFlight": 256,
        "suspend": False,
    }
    rendered = mapping.render_policy(stored)
    assert rendered.policy == TransactionPolicy()
    assert rendered.hash == TransactionPolicy().digest()
    assert mapping.render_policy({}).hash == TransactionPolicy().digest()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"timeouts": {"prepareMs": 5000, "transactionMs": 5000}}, "prepareMs"),
        ({"retries": {"backoffInitialMs": 10, "backoffMaxMs": 5}}, "backoffInitialMs"),
        ({"maxInFlight": 0}, "maxInFlight"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_policy_refused_by_policy_py_is_not_rendered(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        mapping.render_policy(spec)


# -- the ConfigMap --------------------------------------------------------------------------


def test_configmap_body() -> None:
    rendered = mapping.render_policy(SPEC)
    cm = mapping.configmap("demo", "dtx", rendered)
    assert cm["apiVersion"] == "v1"
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "demo-policy"
    assert cm["metadata"]["namespace"] == "dtx"
    assert cm["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "dtx-operator",
        "dtx.dev/policy": "demo",
    }
    assert cm["metadata"]["annotations"] == {"dtx.dev/policy-hash": rendered.hash}
    assert cm["data"] == {"policy.json": rendered.text}
    assert mapping.is_ours(cm, "demo")
    assert not mapping.is_ours(cm, "other")
    assert not mapping.is_ours({"metadata": {"name": "demo-policy"}}, "demo")


def test_configmap_update_only_when_ours_differs() -> None:
    desired = mapping.configmap("demo", "dtx", mapping.render_policy(SPEC))
    desired["metadata"]["ownerReferences"] = [{"uid": "u1", "name": "demo"}]
    actual = json.loads(json.dumps(desired))
    actual["metadata"]["resourceVersion"] = "42"
    actual["metadata"]["labels"]["team"] = "payments"  # someone else's label
    assert not mapping.configmap_needs_update(actual, desired)

    changed = mapping.configmap("demo", "dtx", mapping.render_policy({**SPEC, "maxInFlight": 9}))
    changed["metadata"]["ownerReferences"] = [{"uid": "u1", "name": "demo"}]
    assert mapping.configmap_needs_update(actual, changed)
    body = mapping.configmap_update(actual, changed)
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["metadata"]["labels"]["team"] == "payments"
    assert body["data"] == changed["data"]

    reowned = json.loads(json.dumps(desired))
    reowned["metadata"]["ownerReferences"] = [{"uid": "u2", "name": "demo"}]
    assert mapping.configmap_needs_update(actual, reowned)
    assert mapping.configmap_update(actual, reowned)["metadata"]["ownerReferences"] == [
        {"uid": "u2", "name": "demo"}
    ]


# -- coordinators ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        (None, None),
        ({}, ""),
        ({"matchLabels": {"b": "2", "a": "1"}}, "a=1,b=2"),
        (
            {
                "matchLabels": {"app": "coordinator"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["x", "y"]},
                    {"key": "env", "operator": "NotIn", "values": ["dev"]},
                    {"key": "dtx.dev/coordinator", "operator": "Exists"},
                    {"key": "canary", "operator": "DoesNotExist"},
                ],
            },
            "app=coordinator,tier in (x,y),env notin (dev),dtx.dev/coordinator,!canary",
        ),
    ],
)
def test_label_selector_query(selector: dict[str, Any] | None, query: str | None) -> None:
    assert mapping.label_selector_query(selector) == query


def _pod(name: str, *, ip: str | None = "10.1.0.5", phase: str = "Running", **meta: Any) -> Any:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, **meta}, "status": status}


def test_coordinator_targets() -> None:
    pods = [
        _pod("c-2", annotations={"dtx.dev/status-port": "8081"}),
        _pod("c-1"),
        _pod("pending", ip=None, phase="Pending"),
        _pod("no-ip", ip=None),
        _pod("done", phase="Succeeded"),
        _pod("leaving", deletionTimestamp="2026-01-01T00:00:00Z"),
        _pod("bad-port", annotations={"dtx.dev/status-port": "http"}),
        _pod("v6", ip="fd00::5"),
    ]
    targets = mapping.coordinator_targets(pods)
    assert [t.pod for t in targets] == ["bad-port", "c-1", "c-2", "v6"]
    by_pod = {t.pod: t for t in targets}
    assert by_pod["c-1"].url == "http://10.1.0.5:9464/status"
    assert by_pod["c-2"].url == "http://10.1.0.5:8081/status"
    assert by_pod["v6"].url == "http://[fd00::5]:9464/status"
    assert by_pod["bad-port"].url is None
    assert "dtx.dev/status-port" in (by_pod["bad-port"].error or "")


# -- status -----------------------------------------------------------------------------------


def _status(
    observations: list[Observation],
    *,
    applied: Applied = APPLIED,
    previous: dict[str, Any] | None = None,
    now: datetime.datetime = T0,
    generation: int = 3,
) -> dict[str, Any]:
    return mapping.compute_status(
        generation=generation,
        policy_hash="abc",
        applied=applied,
        observations=observations,
        previous=previous,
        now=now,
    )


def _cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    found = mapping.condition_of(status, kind)
    assert found is not None, kind
    return dict(found)


def test_status_no_coordinators() -> None:
    status = _status([])
    assert status["observedGeneration"] == 3
    assert status["policyHash"] == "abc"
    assert status["coordinators"] == 0
    assert status["coordinatorsInSync"] == 0
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Applied", "Degraded"]
    ready = _cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "NoCoordinators")
    assert ready["observedGeneration"] == 3
    assert ready["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    applied = _cond(status, "Applied")
    assert (applied["status"], applied["reason"]) == ("True", "ConfigMapWritten")
    degraded = _cond(status, "Degraded")
    assert degraded["status"] == "False"


def test_status_all_in_sync() -> None:
    status = _status([Observation("c-0", "abc"), Observation("c-1", "abc")])
    assert (status["coordinators"], status["coordinatorsInSync"]) == (2, 2)
    ready = _cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AllCoordinatorsInSync")
    assert _cond(status, "Degraded")["status"] == "False"


def test_status_some_out_of_sync_is_a_rollout_then_degraded() -> None:
    observations = [Observation("c-0", "abc"), Observation("c-1", "old")]
    first = _status(observations)
    assert (first["coordinators"], first["coordinatorsInSync"]) == (2, 1)
    ready = _cond(first, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Rollout")
    assert "1 of 2" in ready["message"]
    assert "c-1" in ready["message"]
    assert _cond(first, "Degraded")["status"] == "False"

    later = _status(observations, previous=first, now=T0 + mapping.ROLLOUT_GRACE)
    degraded = _cond(later, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CoordinatorsOutOfSync")
    assert "c-1 (old)" in degraded["message"]
    # Ready has been False all along
    assert _cond(later, "Ready")["lastTransitionTime"] == ready["lastTransitionTime"]


def test_status_unreachable_coordinator() -> None:
    status = _status([Observation("c-0", "abc"), Observation("c-1", None, "connection refused")])
    assert (status["coordinators"], status["coordinatorsInSync"]) == (2, 1)
    assert _cond(status, "Ready")["status"] == "False"
    degraded = _cond(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CoordinatorUnreachable")
    assert "c-1 (connection refused)" in degraded["message"]


def test_status_not_applied() -> None:
    refused = Applied(False, "InvalidPolicy", "spec: timeouts.prepareMs: too large")
    status = _status([Observation("c-0", "abc")], applied=refused)
    for kind in ("Ready", "Applied"):
        cond = _cond(status, kind)
        assert (cond["status"], cond["reason"]) == ("False", "InvalidPolicy")
        assert "prepareMs" in cond["message"]
    assert status["policyHash"] == "abc"  # the last one applied is still what counts


def test_status_without_any_applied_policy_has_no_hash() -> None:
    status = mapping.compute_status(
        generation=1,
        policy_hash=None,
        applied=Applied(False, "ConfigMapWriteFailed", "forbidden"),
        observations=[],
        previous=None,
        now=T0,
    )
    assert "policyHash" not in status


def test_last_transition_time_kept_while_status_unchanged() -> None:
    first = _status([Observation("c-0", "abc")])
    later = T0 + datetime.timedelta(minutes=5)
    again = _status([Observation("c-0", "abc")], previous=first, now=later)
    assert again == first  # nothing changed: no patch needed

    # a new generation with the same outcome: times kept, observedGeneration moves
    newer = _status([Observation("c-0", "abc")], previous=first, now=later, generation=4)
    for kind in ("Ready", "Applied", "Degraded"):
        assert _cond(newer, kind)["lastTransitionTime"] == "2026-01-02T03:04:05Z"
        assert _cond(newer, kind)["observedGeneration"] == 4

    # a change of status moves the time of that condition only
    rolled = _status([Observation("c-0", "old")], previous=first, now=later)
    assert _cond(rolled, "Ready")["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert _cond(rolled, "Applied")["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    # a change of reason alone keeps it
    rollout_again = _status(
        [Observation("c-0", None, "timeout")],
        previous=rolled,
        now=later + datetime.timedelta(seconds=30),
    )
    assert _cond(rollout_again, "Ready")["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_many_pods_are_counted_not_all_named() -> None:
    observations = [Observation(f"c-{i:02}", "old") for i in range(12)]
    message = _cond(_status(observations), "Ready")["message"]
    assert "c-00" in message
    assert "c-11" not in message
    assert "and 7 more" in message
