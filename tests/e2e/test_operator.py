"""The dtx operator against a real control plane (dtx_infra.kube), as a real process.

The operator runs as ``python -m dtx_operator`` with nothing but a token of the
``dtx-operator`` service account from k8s/operator/rbac.yaml, so every test also proves
that RBAC is enough. A policy reaching running coordinator pods through the kubelet's
ConfigMap volume is tested on the real node (tests/e2e/test_cluster.py); nothing here
plays the kubelet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dtx_infra.kube import ControlPlane
from tests.support.kube_harness import (
    OPERATOR_RBAC,
    AdminApi,
    OperatorProcess,
    eventually,
    install_crds,
    service_account_kubeconfig,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NS = "dtx"  # the namespace of k8s/operator/rbac.yaml
SA = f"system:serviceaccount:{NS}:dtx-operator"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The control plane with the namespace and the operator's RBAC, not yet the CRD."""
    with ControlPlane(tmp_path_factory.mktemp("kube")) as bare:
        bare.kubectl("create", "namespace", NS)
        bare.kubectl("apply", "-f", str(OPERATOR_RBAC))
        # Pods need the namespace's default service account; the controller-manager makes it.
        eventually(
            lambda: bare.kubectl("-n", NS, "get", "sa", "default", check=False).returncode == 0,
            "serviceaccount default",
        )
        yield bare


@pytest.fixture(scope="module")
def cp(plane: ControlPlane) -> ControlPlane:
    install_crds(plane)
    return plane


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("operator-sa")
    return service_account_kubeconfig(plane, NS, "dtx-operator", state / "kubeconfig")


@pytest.fixture(scope="module")
def api(cp: ControlPlane) -> AdminApi:
    return AdminApi(cp)


@pytest.fixture(scope="module")
def operator(
    cp: ControlPlane, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    state = tmp_path_factory.mktemp("operator")
    proc = OperatorProcess(operator_kubeconfig, NS, state / "operator.log").start()
    try:
        yield proc
    finally:
        proc.stop()
        print(f"operator log ({proc.log_path}):\n{proc.tail(60)}")


# -- helpers -------------------------------------------------------------------------------


def policy(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "dtx.dev/v1alpha1",
            "kind": "TransactionPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        }
    )


def apply(cp: ControlPlane, name: str, spec: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=policy(name, spec))


def get_txp(api: AdminApi, name: str) -> dict[str, Any] | None:
    return api.get(f"/apis/dtx.dev/v1alpha1/namespaces/{NS}/transactionpolicies/{name}")


def get_cm(api: AdminApi, name: str) -> dict[str, Any] | None:
    return api.get(f"/api/v1/namespaces/{NS}/configmaps/{name}")


def condition(txp: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((txp or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            found: dict[str, Any] = cond
            return found
    return {}


def ready_and_current(api: AdminApi, name: str) -> dict[str, Any] | None:
    """The policy once Ready=True for its current generation, else None."""
    txp = get_txp(api, name)
    if txp is None:
        return None
    status = txp.get("status") or {}
    current = status.get("observedGeneration") == txp["metadata"]["generation"]
    ok = condition(txp, "Ready").get("status") == "True"
    return txp if current and ok else None


# -- 0. no CRD, no operator -------------------------------------------------------------------


def test_operator_exits_without_the_crd(
    plane: ControlPlane, operator_kubeconfig: Path, tmp_path: Path
) -> None:
    crd = plane.kubectl("get", "crd", "transactionpolicies.dtx.dev", check=False)
    if crd.returncode == 0:
        pytest.skip("the CRD is already installed (this test must run first in the module)")
    proc = OperatorProcess(operator_kubeconfig, NS, tmp_path / "operator.log")
    proc.start(wait=False)
    try:
        assert proc.process is not None
        code = proc.process.wait(30)
    finally:
        proc.kill()
    assert code != 0
    assert "dtx.dev/v1alpha1 is not served: install the CRD" in proc.log()


# -- a. a valid policy becomes Ready --------------------------------------------------------


def test_valid_policy_becomes_ready(cp: ControlPlane, api: AdminApi, operator: OperatorProcess):
    started = time.monotonic()
    apply(
        cp,
        "alpha",
        {
            "selector": {"matchLabels": {"app": "nothing-here"}},
            "participants": [{"name": "payments", "endpoint": "payments:50051"}],
            "maxInFlight": 32,
        },
    )
    txp = eventually(lambda: ready_and_current(api, "alpha"), "alpha Ready", timeout=10)
    print(f"alpha Ready after {time.monotonic() - started:.1f}s")
    assert txp["status"]["observedGeneration"] == txp["metadata"]["generation"] == 1
    assert condition(txp, "Ready")["reason"] == "NoCoordinators"
    assert condition(txp, "Applied")["reason"] == "ConfigMapWritten"
    assert condition(txp, "Degraded")["status"] == "False"
    assert txp["status"]["coordinators"] == 0

    cm = get_cm(api, "alpha-policy")
    assert cm is not None
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "dtx-operator"
    assert cm["metadata"]["labels"]["dtx.dev/policy"] == "alpha"
    [owner] = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("TransactionPolicy", txp["metadata"]["uid"])
    document = json.loads(cm["data"]["policy.json"])
    assert document["maxInFlight"] == 32
    assert "selector" not in document
    assert cm["metadata"]["annotations"]["dtx.dev/policy-hash"] == txp["status"]["policyHash"]

    table = cp.kubectl("-n", NS, "get", "txp").stdout.splitlines()
    assert table[0].split() == ["NAME", "PROTOCOL", "MAXINFLIGHT", "READY", "AGE"]
    row = next(line.split() for line in table[1:] if line.startswith("alpha "))
    assert row[:4] == ["alpha", "TwoPhaseCommit", "32", "True"]
    wide = cp.kubectl("-n", NS, "get", "txp", "alpha", "-o", "wide").stdout.splitlines()
    header = wide[0].split()
    assert {"COORDINATORS", "HASH"} <= set(header)
    assert wide[1].split()[header.index("HASH")] == txp["status"]["policyHash"]
    # the category and the short name
    assert (
        "transactionpolicy.dtx.dev/alpha" in cp.kubectl("-n", NS, "get", "dtx", "-o", "name").stdout
    )


# -- b. the API server refuses what policy.py would --------------------------------------------

REFUSED = [
    ({"timeouts": {"stepMs": 500}}, "timeouts.stepMs applies only to protocol Saga"),
    (
        {"protocol": "Saga", "timeouts": {"prepareMs": 500}},
        "timeouts.prepareMs and timeouts.commitMs apply only to protocol TwoPhaseCommit",
    ),
    (
        {"protocol": "Saga", "timeouts": {"commitMs": 500}},
        "timeouts.prepareMs and timeouts.commitMs apply only to protocol TwoPhaseCommit",
    ),
    (
        {"timeouts": {"prepareMs": 5000, "transactionMs": 5000}},
        "timeouts.prepareMs must be below timeouts.transactionMs",
    ),
    # an unset prepareMs is 2000 for the coordinators, so it counts here too
    ({"timeouts": {"transactionMs": 1500}}, "timeouts.prepareMs must be below"),
    (
        {"protocol": "Saga", "timeouts": {"stepMs": 3000, "transactionMs": 3000}},
        "timeouts.stepMs must be below timeouts.transactionMs",
    ),
    (
        {"retries": {"backoffInitialMs": 6000}},
        "retries.backoffInitialMs must be at most retries.backoffMaxMs",
    ),
    (
        {
            "participants": [
                {"name": "payments", "endpoint": "a:1"},
                {"name": "payments", "endpoint": "b:1"},
            ]
        },
        "participants must have unique names",
    ),
    (
        {"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
        "values must be non-empty for In and NotIn",
    ),
    ({"maxInFlight": 0}, "spec.maxInFlight in body should be greater than or equal to 1"),
    ({"maxInFlight": 100001}, "spec.maxInFlight in body should be less than or equal to 100000"),
    ({"timeouts": {"transactionMs": 99}}, "spec.timeouts.transactionMs in body should be greater"),
    ({"retries": {"jitterPercent": 101}}, "spec.retries.jitterPercent in body should be less"),
    ({"recovery": {"onExhausted": "Later"}}, 'Unsupported value: "Later"'),
    ({"protocol": "ThreePhaseCommit"}, 'Unsupported value: "ThreePhaseCommit"'),
    (
        {"participants": [{"name": "Payments", "endpoint": "a:1"}]},
        "spec.participants[0].name in body should match",
    ),
    (
        {"participants": [{"name": "p", "endpoint": "a:1", "timeoutMs": 5}]},
        "spec.participants[0].timeoutMs in body should be greater than or equal to 10",
    ),
    ({"participants": [{"name": "p", "endpoint": "no-port"}]}, "endpoint in body should match"),
    ({"suspend": "yes"}, "spec.suspend"),
    ({"bogus": 1}, 'unknown field "spec.bogus"'),
]


@pytest.mark.parametrize(("spec", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_api_server_refuses_invalid_policy(cp: ControlPlane, spec: dict[str, Any], message: str):
    result = cp.kubectl("apply", "-f", "-", input=policy("refused", spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert cp.kubectl("-n", NS, "get", "txp", "refused", check=False).returncode != 0


def test_api_server_refuses_long_names(cp: ControlPlane) -> None:
    result = cp.kubectl("apply", "-f", "-", input=policy("x" * 64, {}), check=False)
    assert result.returncode != 0
    assert "metadata.name must be at most 63 characters" in result.stderr


def test_defaults_are_filled_in(cp: ControlPlane) -> None:
    out = cp.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-f", "-", input=policy("defaults", {})
    )
    spec = json.loads(out.stdout)["spec"]
    assert spec["protocol"] == "TwoPhaseCommit"
    assert spec["maxInFlight"] == 256
    assert spec["timeouts"] == {"transactionMs": 10000}  # protocol-specific ones stay unset
    assert spec["retries"]["backoffMaxMs"] == 5000
    assert spec["recovery"]["onExhausted"] == "Park"


# -- d. deleting a policy collects its ConfigMap ---------------------------------------------


def test_delete_collects_configmap(cp: ControlPlane, api: AdminApi, operator: OperatorProcess):
    apply(cp, "doomed", {})
    eventually(lambda: ready_and_current(api, "doomed"), "doomed Ready", timeout=10)
    assert get_cm(api, "doomed-policy") is not None
    cp.kubectl("-n", NS, "delete", "txp", "doomed", "--wait=false")
    eventually(lambda: get_txp(api, "doomed") is None, "policy deleted", timeout=30)
    eventually(lambda: get_cm(api, "doomed-policy") is None, "ConfigMap collected", timeout=30)


def test_configmap_edited_by_hand_is_repaired(
    cp: ControlPlane, api: AdminApi, operator: OperatorProcess
) -> None:
    apply(cp, "repair", {"maxInFlight": 5})
    eventually(lambda: ready_and_current(api, "repair"), "repair Ready", timeout=10)
    cp.kubectl(
        "-n", NS, "patch", "configmap", "repair-policy", "--type=merge",
        "-p", json.dumps({"data": {"policy.json": "{}"}}),
    )  # fmt: skip
    eventually(
        lambda: (
            json.loads((get_cm(api, "repair-policy") or {})["data"]["policy.json"]).get(
                "maxInFlight"
            )
            == 5
        ),
        "ConfigMap repaired",
        timeout=10,
    )
    cp.kubectl("-n", NS, "delete", "configmap", "repair-policy")
    eventually(lambda: get_cm(api, "repair-policy"), "ConfigMap recreated", timeout=10)


def test_foreign_configmap_is_left_alone(
    cp: ControlPlane, api: AdminApi, operator: OperatorProcess
) -> None:
    cp.kubectl("-n", NS, "create", "configmap", "taken-policy", "--from-literal=policy.json={}")
    apply(cp, "taken", {})

    def refused() -> dict[str, Any] | None:
        txp = get_txp(api, "taken")
        return txp if condition(txp, "Applied").get("reason") == "ConfigMapConflict" else None

    txp = eventually(refused, "Applied=False/ConfigMapConflict", timeout=10)
    assert condition(txp, "Applied")["status"] == "False"
    assert condition(txp, "Ready")["status"] == "False"
    cm = get_cm(api, "taken-policy")
    assert cm is not None
    assert cm["data"] == {"policy.json": "{}"}
    assert not cm["metadata"].get("ownerReferences")
    # reported once as a Warning event on the policy
    events = eventually(
        lambda: [
            e
            for e in (api.get(f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
            if e["involvedObject"].get("name") == "taken" and e["type"] == "Warning"
        ],
        "a Warning event",
        timeout=10,
    )
    assert [e["reason"] for e in events] == ["ConfigMapConflict"]
    assert "not managed by dtx-operator" in events[0]["message"]
    time.sleep(3.5)  # another timer round: no second event for the same failure
    again = [
        e
        for e in (api.get(f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
        if e["involvedObject"].get("name") == "taken" and e["type"] == "Warning"
    ]
    assert len(again) == len(events)
    cp.kubectl("-n", NS, "delete", "txp", "taken")


# -- e. a killed operator resumes ----------------------------------------------------------------


def test_killed_operator_resumes(cp: ControlPlane, api: AdminApi, operator: OperatorProcess):
    apply(cp, "resume", {"maxInFlight": 12})
    before = eventually(lambda: ready_and_current(api, "resume"), "resume Ready", timeout=10)
    time.sleep(1)  # let any in-flight write of the first rounds land
    cm_before = get_cm(api, "resume-policy")
    txp_before = get_txp(api, "resume")
    assert cm_before is not None
    assert txp_before is not None

    operator.kill()
    operator.start()
    time.sleep(3 * 3 + 1)  # three timer rounds of the new process
    assert operator.process is not None
    assert operator.process.poll() is None
    cm_after = get_cm(api, "resume-policy")
    assert cm_after is not None
    assert cm_after["metadata"]["uid"] == cm_before["metadata"]["uid"]
    assert cm_after["metadata"]["resourceVersion"] == cm_before["metadata"]["resourceVersion"]
    managed = cp.kubectl(
        "-n", NS, "get", "configmaps", "-l", "dtx.dev/policy=resume", "-o", "name"
    ).stdout.split()
    assert managed == ["configmap/resume-policy"]
    txp_after = get_txp(api, "resume")
    assert txp_after is not None
    assert txp_after["status"] == before["status"]  # same status, same transition times
    assert txp_after["metadata"]["resourceVersion"] == txp_before["metadata"]["resourceVersion"]

    # A change made while the operator is down is applied when it is back.
    operator.kill()
    apply(cp, "resume", {"maxInFlight": 7})
    operator.start()
    txp = eventually(lambda: ready_and_current(api, "resume"), "resume Ready at gen 2", 10)
    assert txp["metadata"]["generation"] == 2
    cm = get_cm(api, "resume-policy")
    assert cm is not None
    assert cm["metadata"]["uid"] == cm_before["metadata"]["uid"]  # updated, not recreated
    assert json.loads(cm["data"]["policy.json"])["maxInFlight"] == 7
    assert txp["status"]["policyHash"] != before["status"]["policyHash"]


# -- f. RBAC: what the operator may do, and nothing else -----------------------------------------

ALLOWED = [
    ("list", "transactionpolicies.dtx.dev"),
    ("watch", "transactionpolicies.dtx.dev"),
    ("patch", "transactionpolicies.dtx.dev"),
    ("patch", "transactionpolicies.dtx.dev/status"),
    ("update", "transactionpolicies.dtx.dev/finalizers"),
    ("get", "configmaps"),
    ("create", "configmaps"),
    ("update", "configmaps"),
    ("list", "pods"),
    ("create", "events"),
]
DENIED = [
    ("delete", "pods"),
    ("create", "pods"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("create", "deployments.apps"),
    ("delete", "configmaps"),
    ("delete", "transactionpolicies.dtx.dev"),
    ("create", "transactionpolicies.dtx.dev"),
    ("update", "transactionpolicies.dtx.dev/status"),
    ("create", "serviceaccounts/token"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
]


def can_i(cp: ControlPlane, verb: str, resource: str, namespace: str = NS) -> bool:
    resource, _, sub = resource.partition("/")
    subresource = [f"--subresource={sub}"] if sub else []
    result = cp.kubectl(
        "auth", "can-i", verb, resource, *subresource, "-n", namespace, f"--as={SA}", check=False
    )
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, result.stderr
    return answer == "yes"


def test_rbac_allows_exactly_what_the_operator_needs(cp: ControlPlane) -> None:
    assert [r for r in ALLOWED if not can_i(cp, *r)] == []
    assert [r for r in DENIED if can_i(cp, *r)] == []
    # and only in its own namespace
    cp.kubectl("create", "namespace", "elsewhere")
    assert [r for r in ALLOWED if can_i(cp, *r, namespace="elsewhere")] == []


def test_operator_never_lacked_a_permission(operator: OperatorProcess) -> None:
    log = operator.log()
    for sign in ("Forbidden", "forbidden", "HTTP 403", "Traceback"):
        assert sign not in log, operator.tail(80)
