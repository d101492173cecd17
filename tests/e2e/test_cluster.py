"""dtx on a real Kubernetes node: the charts' pods, their probes, and orders through them.

``dtx cluster up`` (dtx_infra.cluster) brings up one node on this machine: containerd and
runc, the control plane, kubelet, kube-proxy, the CNI bridge and CoreDNS. The images are
the ones ``make images`` built without a Docker engine (dtx_infra.images), imported into
the node's containerd. Then, as a user would:

- ``helm install`` of dtx-crds, the observability chart (Jaeger and Prometheus built here;
  Grafana is AGPL and stays off) and dtx with its development PostgreSQL and Kafka, in
  namespaces that enforce the restricted Pod Security Standard, with the charts' security
  contexts and read-only roots as they ship; every pod becomes Ready through its probes;
- orders placed through the gateway's NodePort under both protocols reach their outcomes,
  money and stock move accordingly, and notifications arrive through Kafka; the services
  find each other by their cluster DNS names;
- ``kubectl apply`` of a TransactionPolicy reaches the coordinator pods through the
  kubelet's own ConfigMap volume refresh, changes what they do, and the policy's status
  turns Ready with the pods' hash; the operator runs as a pod under its service account.

Nothing here builds: a missing tool or image fails at once, naming ``make images``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dtx_gateway.auth import mint_token
from dtx_infra import images, toolchain
from dtx_infra.cluster import NODE_IP, Cluster, running
from dtx_infra.kube import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(2400)]

APP = REPO_ROOT / "charts" / "dtx"
CRDS = REPO_ROOT / "charts" / "dtx-crds"
OBS = REPO_ROOT / "observability" / "chart"
CLUSTER_VALUES = APP / "ci" / "cluster-values.yaml"
NS = "dtx"
OBS_NS = "observability"
GATEWAY_NODE_PORT = 30080
GATEWAY = f"http://{NODE_IP}:{GATEWAY_NODE_PORT}"


def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(1)


def helm(cluster: Cluster, *args: str, timeout: float = 900) -> str:
    import subprocess

    result = subprocess.run(
        [str(toolchain.binary("helm")), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr[-4000:]}"
    return result.stdout


def restricted_namespace(cluster: Cluster, name: str) -> None:
    cluster.kubectl(
        "apply", "-f", "-",
        input=json.dumps({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }},
        }),
    )  # fmt: skip


def image_values() -> list[str]:
    """--set flags that point every chart at the images built here, never pulled."""
    sets: list[str] = []
    for key, name in (
        ("image", "dtx"),
        ("postgresql.image", "postgresql"),
        ("kafka.image", "kafka"),
    ):
        ref, _ = images.archive(name)
        repository, tag = ref.rsplit(":", 1)
        sets += [f"{key}.repository={repository}", f"{key}.tag={tag}", f"{key}.pullPolicy=Never"]
    return [arg for s in sets for arg in ("--set", s)]


def observability_values() -> list[str]:
    sets = ["tracing.backend=jaeger", "grafana.enabled=false"]
    for key, name in (("jaeger.image", "jaeger"), ("prometheus.image", "prometheus")):
        ref, _ = images.archive(name)
        repository, tag = ref.rsplit(":", 1)
        sets += [f"{key}.repository={repository}", f"{key}.tag={tag}", f"{key}.pullPolicy=Never"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = time.monotonic()
    with running(tmp_path_factory.mktemp("cluster")) as node:
        print(f"cluster up in {time.monotonic() - started:.1f}s")
        try:
            yield node
        finally:
            pods = node.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
            print(f"pods at the end:\n{pods}")


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    """The three charts installed and rolled out; the time it took is printed."""
    started = time.monotonic()
    cluster.load_images(["dtx", "postgresql", "kafka", "jaeger", "prometheus"])
    print(f"images loaded into the node in {time.monotonic() - started:.1f}s")
    for ns in (NS, OBS_NS):
        restricted_namespace(cluster, ns)
    helm(cluster, "install", "dtx-crds", str(CRDS), "--wait", "--timeout=2m")
    helm(
        cluster, "install", "dtx-observability", str(OBS), "-n", OBS_NS,
        *observability_values(), "--wait", "--timeout=5m",
    )  # fmt: skip
    helm(
        cluster, "install", "dtx", str(APP), "-n", NS, "-f", str(CLUSTER_VALUES),
        *image_values(), "--wait", "--timeout=10m",
    )  # fmt: skip
    print(f"charts installed and rolled out in {time.monotonic() - started:.1f}s")
    return cluster


def pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# -- the node ------------------------------------------------------------------------------


def test_the_node_runs_real_pods_with_dns(cluster: Cluster) -> None:
    node = json.loads(cluster.kubectl("get", "node", "-o", "json").stdout)["items"][0]
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert info["kubeletVersion"] == toolchain.group("kubernetes").version()
    (dns,) = pods(cluster, "kube-system")
    assert ready(dns), dns["status"]
    assert dns["status"]["podIP"].startswith("198.18.")


# -- the charts on the node ------------------------------------------------------------------


def test_every_workload_rolls_out_and_every_pod_is_ready(installed: Cluster) -> None:
    for ns in (NS, OBS_NS):
        for kind in ("deployments", "statefulsets"):
            listed = json.loads(installed.kubectl("-n", ns, "get", kind, "-o", "json").stdout)
            for item in listed["items"]:
                want = item["spec"].get("replicas", 1)
                assert item["status"].get("readyReplicas", 0) == want, (ns, kind, item["status"])
        for pod in pods(installed, ns):
            if pod["metadata"].get("ownerReferences", [{}])[0].get("kind") == "Job":
                continue
            assert ready(pod), (pod["metadata"]["name"], pod["status"])
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
    labels = json.loads(installed.kubectl("get", "namespace", NS, "-o", "json").stdout)
    assert labels["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_a_pod_without_the_restricted_context_is_refused(installed: Cluster) -> None:
    """Admission really enforces the restricted standard the charts' pods pass."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose", "namespace": NS},
        "spec": {"containers": [{"name": "x", "image": images.archive("pause")[0]}]},
    }  # fmt: skip
    refused = installed.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr


def secret_value(cluster: Cluster, namespace: str, selector: str, key: str) -> str:
    listed = json.loads(
        cluster.kubectl("-n", namespace, "get", "secrets", "-l", selector, "-o", "json").stdout
    )
    for item in listed["items"]:
        if key in (item.get("data") or {}):
            return base64.b64decode(item["data"][key]).decode()
    raise AssertionError(f"no secret with {key} among {selector}")


@pytest.fixture(scope="module")
def admin(installed: Cluster) -> dict[str, str]:
    secret = jwt_secret(installed)
    return {"Authorization": f"Bearer {mint_token(secret, 'admin', 'e2e', 3600)}"}


def jwt_secret(cluster: Cluster) -> str:
    listed = json.loads(cluster.kubectl("-n", NS, "get", "secrets", "-o", "json").stdout)
    for item in listed["items"]:
        if item["metadata"]["name"].endswith("jwt"):
            return base64.b64decode(item["data"]["secret"]).decode()
    raise AssertionError("no JWT secret in namespace dtx")


def place(
    http: httpx.Client, headers: dict[str, str], account: str, sku: str, qty: int, protocol: str
) -> httpx.Response:
    return http.post(
        "/v1/orders",
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        json={"account_id": account, "items": [{"sku": sku, "quantity": qty}],
              "protocol": protocol},
    )  # fmt: skip


def test_orders_through_the_gateway_reach_their_outcomes(
    installed: Cluster, admin: dict[str, str]
) -> None:
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        created = http.post(
            "/v1/accounts", headers=admin,
            json={"owner": "kim", "currency": "EUR", "balance_minor": 10_000},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        account = created.json()["id"]
        sku = f"MUG-{uuid.uuid4().hex[:6].upper()}"
        made = http.post(
            "/v1/products", headers=admin,
            json={"sku": sku, "name": "a mug", "price_minor": 1_000, "stock": 5},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        for protocol in ("2pc", "saga"):
            placed = place(http, admin, account, sku, 2, protocol)
            assert placed.status_code == 201, placed.text
            assert placed.json()["status"] == "confirmed", placed.text
        # More than the stock under a saga: cancelled, the reservation compensated.
        cancelled = place(http, admin, account, sku, 3, "saga")
        assert cancelled.json()["status"] in ("cancelled", "rejected"), cancelled.text
        # More than the balance under 2PC: rejected, nothing moved.
        rejected = place(http, admin, account, sku, 7, "2pc")
        assert rejected.json()["status"] == "rejected", rejected.text
        balance = http.get(f"/v1/accounts/{account}", headers=admin).json()["balance_minor"]
        product = http.get(f"/v1/products/{sku}", headers=admin).json()
        assert balance == 10_000 - 4 * 1_000
        # Stock moves from available to reserved for the two confirmed orders only.
        assert (product["available"], product["reserved"]) == (1, 4)

        def notified() -> list[dict[str, Any]] | None:
            got = http.get(f"/v1/accounts/{account}/notifications", headers=admin)
            items: list[dict[str, Any]] = got.json().get(
                "notifications", got.json().get("items", [])
            )
            return items if len(items) >= 4 else None

        found = eventually(notified, "notifications of the terminal orders", timeout=90)
        assert len({n["order_id"] for n in found}) == len(found)


def test_latency_of_orders_through_the_node(installed: Cluster, admin: dict[str, str]) -> None:
    """Not a speed test: the figures are printed for the notes; each order must confirm."""
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        account = http.post(
            "/v1/accounts", headers=admin,
            json={"owner": "max", "currency": "EUR", "balance_minor": 1_000_000},
        ).json()["id"]  # fmt: skip
        sku = f"CUP-{uuid.uuid4().hex[:6].upper()}"
        http.post(
            "/v1/products", headers=admin,
            json={"sku": sku, "name": "a cup", "price_minor": 10, "stock": 1_000},
        )  # fmt: skip
        for protocol in ("2pc", "saga"):
            samples = []
            for _ in range(20):
                start = time.monotonic()
                placed = place(http, admin, account, sku, 1, protocol)
                samples.append(time.monotonic() - start)
                assert placed.json()["status"] == "confirmed", placed.text
            samples.sort()
            print(
                f"{protocol} through the node's gateway, 20 orders one at a time: "
                f"p50 {samples[9] * 1000:.1f} ms, max {samples[-1] * 1000:.1f} ms"
            )


def test_services_find_each_other_by_cluster_dns(installed: Cluster) -> None:
    code = f"import socket; print(socket.gethostbyname('dtx-orders.{NS}.svc.cluster.local'))"
    out = installed.kubectl(
        "-n", NS, "exec", "deploy/dtx-gateway", "--", "python", "-c", code
    ).stdout.strip()
    service_ip = installed.kubectl(
        "-n", NS, "get", "svc", "dtx-orders", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    assert out == service_ip
    assert service_ip.startswith("198.19.")


# -- a TransactionPolicy reaches the coordinators through the kubelet -------------------------


def txp(cluster: Cluster, name: str = "default") -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        cluster.kubectl("-n", NS, "get", "transactionpolicy", name, "-o", "json").stdout
    )
    return found


def in_sync(cluster: Cluster, old_hash: str | None = None) -> dict[str, Any] | None:
    policy = txp(cluster)
    status = policy.get("status") or {}
    ready_now = any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
    )
    if not ready_now or status.get("observedGeneration") != policy["metadata"]["generation"]:
        return None
    if not status.get("coordinators") or status.get("coordinatorsInSync") != status.get(
        "coordinators"
    ):
        return None
    if old_hash is not None and status.get("policyHash") == old_hash:
        return None
    return policy


def test_a_policy_change_reaches_the_coordinator_pods(
    installed: Cluster, admin: dict[str, str]
) -> None:
    operator = [p for p in pods(installed, NS) if "operator" in p["metadata"]["name"]]
    assert operator, "the operator runs as a pod"
    assert operator[0]["spec"]["serviceAccountName"].endswith("operator")
    before = eventually(lambda: in_sync(installed), "the default policy in sync", timeout=180)
    old_hash = before["status"]["policyHash"]
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        account = http.post(
            "/v1/accounts", headers=admin,
            json={"owner": "lee", "currency": "EUR", "balance_minor": 10_000},
        ).json()["id"]  # fmt: skip
        sku = f"PEN-{uuid.uuid4().hex[:6].upper()}"
        http.post(
            "/v1/products", headers=admin,
            json={"sku": sku, "name": "a pen", "price_minor": 100, "stock": 50},
        )  # fmt: skip
        first = place(http, admin, account, sku, 1, "2pc")
        assert first.json()["status"] == "confirmed", first.text
        installed.kubectl(
            "-n", NS, "patch", "transactionpolicy", "default", "--type=merge",
            "-p", json.dumps({"spec": {"suspend": True}}),
        )  # fmt: skip
        started = time.monotonic()
        after = eventually(
            lambda: in_sync(installed, old_hash), "the suspended policy in sync", timeout=180
        )
        print(f"policy reached every coordinator pod in {time.monotonic() - started:.1f}s")
        assert after["status"]["coordinators"] == after["status"]["coordinatorsInSync"] >= 2
        # A suspended coordinator starts nothing: the order is taken but stays pending.
        held = place(http, admin, account, sku, 1, "2pc")
        assert held.status_code == 201, held.text
        assert held.json()["status"] == "pending", held.text
        installed.kubectl(
            "-n", NS, "patch", "transactionpolicy", "default", "--type=merge",
            "-p", json.dumps({"spec": {"suspend": False}}),
        )  # fmt: skip
        eventually(
            lambda: in_sync(installed, after["status"]["policyHash"]),
            "the resumed policy in sync",
            timeout=180,
        )
        resumed = place(http, admin, account, sku, 1, "2pc")
        assert resumed.json()["status"] == "confirmed", resumed.text


def test_no_pod_restarted(installed: Cluster) -> None:
    for ns in (NS, OBS_NS):
        for pod in pods(installed, ns):
            for status in pod["status"].get("containerStatuses") or []:
                assert status["restartCount"] == 0, (pod["metadata"]["name"], status)
