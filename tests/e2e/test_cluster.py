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
import concurrent.futures
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dtx_gateway.auth import mint_token
from dtx_infra import images, toolchain
from dtx_infra.cluster import NODE_IP, Cluster, running
from dtx_infra.kube import REPO_ROOT
from tests.support.dashboards import as_promql, dashboard_expressions
from tests.support.kube_harness import eventually
from tests.support.traces import spans_by_service

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(2400)]

APP = REPO_ROOT / "charts" / "dtx"
CRDS = REPO_ROOT / "charts" / "dtx-crds"
OBS = REPO_ROOT / "observability" / "chart"
CLUSTER_VALUES = APP / "ci" / "cluster-values.yaml"
NS = "dtx"
OBS_NS = "observability"
GATEWAY_NODE_PORT = 30080
GATEWAY = f"http://{NODE_IP}:{GATEWAY_NODE_PORT}"


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
    # Scraped and evaluated every 5 s here (the chart's 15 s is right for users): rate()
    # windows fill, and alerts evaluate, within a test's patience.
    sets = [
        "tracing.backend=jaeger",
        "grafana.enabled=false",
        "prometheus.scrapeInterval=5s",
        "prometheus.evaluationInterval=5s",
    ]
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


@pytest.fixture
def admin(installed: Cluster) -> dict[str, str]:
    """An admin token, once the gateway's NodePort answers (it is waited for, bounded, and
    any wait is printed: a refused connection after the rollout is worth knowing about)."""
    secret = jwt_secret(installed)
    headers = {"Authorization": f"Bearer {mint_token(secret, 'admin', 'e2e', 3600)}"}
    started = time.monotonic()

    def answers() -> bool:
        try:
            return httpx.get(f"{GATEWAY}/v1/products/NONE", headers=headers).status_code == 404
        except httpx.HTTPError:
            return False

    eventually(answers, "the gateway's NodePort answering", timeout=120)
    if (waited := time.monotonic() - started) > 1:
        print(f"waited {waited:.1f}s for the gateway's NodePort to answer")
    return headers


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
            got = http.get(
                f"/v1/accounts/{account}/notifications", params={"limit": 500}, headers=admin
            )
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


def apply_policy(cluster: Cluster, *, suspend: bool) -> None:
    """`kubectl apply` of the default policy as a user edits it: its spec, suspended or not."""
    current = txp(cluster)
    edited = {
        "apiVersion": current["apiVersion"],
        "kind": current["kind"],
        "metadata": {"name": "default", "namespace": NS},
        "spec": {**current["spec"], "suspend": suspend},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(edited))


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
        apply_policy(installed, suspend=True)
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
        apply_policy(installed, suspend=False)
        eventually(
            lambda: in_sync(installed, after["status"]["policyHash"]),
            "the resumed policy in sync",
            timeout=180,
        )
        resumed = place(http, admin, account, sku, 1, "2pc")
        assert resumed.json()["status"] == "confirmed", resumed.text


# -- traces and metrics from the pods -----------------------------------------------------------


def service_url(cluster: Cluster, namespace: str, name: str, port: int) -> str:
    """A Service's ClusterIP: kube-proxy's rules route the node's own traffic to it too."""
    ip = cluster.kubectl(
        "-n", namespace, "get", "svc", name, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    return f"http://{ip}:{port}"


def test_one_order_is_one_trace_across_the_pods(installed: Cluster, admin: dict[str, str]) -> None:
    jaeger = service_url(installed, OBS_NS, "dtx-observability-jaeger", 16686)
    trace_id = uuid.uuid4().hex
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        account = http.post(
            "/v1/accounts", headers=admin,
            json={"owner": "tia", "currency": "EUR", "balance_minor": 10_000},
        ).json()["id"]  # fmt: skip
        sku = f"INK-{uuid.uuid4().hex[:6].upper()}"
        http.post(
            "/v1/products", headers=admin,
            json={"sku": sku, "name": "ink", "price_minor": 100, "stock": 10},
        )  # fmt: skip
        placed = http.post(
            "/v1/orders",
            headers={**admin, "Idempotency-Key": uuid.uuid4().hex,
                     "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
            json={"account_id": account, "items": [{"sku": sku, "quantity": 1}],
                  "protocol": "2pc"},
        )  # fmt: skip
        assert placed.json()["status"] == "confirmed", placed.text
    wanted = {"gateway", "orders", "coordinator", "payments", "inventory", "notifications"}

    def whole_trace() -> dict[str, list[dict[str, Any]]] | None:
        got = httpx.get(f"{jaeger}/api/v3/traces/{trace_id}", timeout=10)
        if got.status_code != 200:
            return None
        found = spans_by_service(got.json()["result"])
        return found if wanted <= set(found) else None

    found = eventually(whole_trace, f"trace {trace_id} from every service's pod", timeout=120)
    every = [s for spans in found.values() for s in spans]
    assert {s["traceId"] for s in every} == {trace_id}
    print(f"trace {trace_id}: { ({k: len(v) for k, v in sorted(found.items())}) }")


def prometheus_query(url: str, expr: str) -> list[dict[str, Any]]:
    got = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    assert got.status_code == 200, (expr, got.text)
    result: list[dict[str, Any]] = got.json()["data"]["result"]
    return result


def test_prometheus_scrapes_every_service_pod(installed: Cluster) -> None:
    prometheus = service_url(installed, OBS_NS, "dtx-observability-prometheus", 9090)
    scraped = {
        p["metadata"]["name"]
        for p in pods(installed, NS)
        if p["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"
    }
    assert len(scraped) >= 9, scraped

    def all_up() -> set[str] | None:
        up = prometheus_query(prometheus, 'up{part_of="dtx"} == 1')
        pods_up = {r["metric"]["pod"] for r in up}
        return pods_up if scraped <= pods_up else None

    eventually(all_up, "every dtx pod scraped and up", timeout=120)
    families = prometheus_query(
        prometheus, 'count by (service) ({__name__=~"dtx_.+", namespace="dtx"})'
    )
    services = {r["metric"]["service"] for r in families}
    assert {"gateway", "orders", "payments", "inventory", "coordinator", "saga",
            "notifications"} <= services, services  # fmt: skip


def test_every_dashboard_query_returns_series(installed: Cluster) -> None:
    """After the orders above (both protocols, a refusal and a cancellation), every panel
    of every dashboard has something to draw."""
    prometheus = service_url(installed, OBS_NS, "dtx-observability-prometheus", 9090)
    found = dashboard_expressions()
    assert len(found) > 40
    empty: dict[str, str] = {}
    deadline = time.monotonic() + 180
    pending = dict(found)
    while pending and time.monotonic() < deadline:
        empty = {}
        for where, expr in pending.items():
            if not prometheus_query(prometheus, as_promql(expr)):
                empty[where] = expr
        pending = empty
        if pending:
            time.sleep(10)
    assert not empty, f"panels with no series after load: {json.dumps(empty, indent=1)}"


def test_the_alert_rules_load_into_prometheus(installed: Cluster) -> None:
    """Every alert of observability/rules is loaded, evaluated and healthy. (Making one
    fire on the node is not done here yet: see the notes of the cluster issue.)"""
    import yaml

    prometheus = service_url(installed, OBS_NS, "dtx-observability-prometheus", 9090)
    wanted = {
        rule["alert"]
        for group in yaml.safe_load(
            (REPO_ROOT / "observability" / "rules" / "dtx-alerts.yaml").read_text()
        )["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }

    def loaded() -> dict[str, str] | None:
        got = httpx.get(f"{prometheus}/api/v1/rules", params={"type": "alert"}, timeout=10)
        rules = {
            r["name"]: r["health"]
            for g in got.json()["data"]["groups"]
            for r in g["rules"]
            if r.get("lastEvaluation", "").startswith("2")
        }
        return rules if wanted <= set(rules) else None

    rules = eventually(loaded, "every alert rule evaluated", timeout=60)
    assert {name: rules[name] for name in wanted} == dict.fromkeys(wanted, "ok")


def test_no_pod_restarted(installed: Cluster) -> None:
    for ns in (NS, OBS_NS):
        for pod in pods(installed, ns):
            for status in pod["status"].get("containerStatuses") or []:
                assert status["restartCount"] == 0, (pod["metadata"]["name"], status)


# -- pods deleted under load: money and stock conserved ------------------------------------------

KILL_TARGETS = ("coordinator", "saga", "payments", "inventory", "orders", "gateway")
LOAD_SECONDS = 60.0
KILL_EVERY_SECONDS = 8.0
CLIENTS = 4
KILL_ACCOUNTS, KILL_BALANCE = 6, 100_000
KILL_PRODUCTS = {"BOLT": (100, 2_000), "NUT": (150, 2_000), "GEAR": (700, 15)}


@dataclass
class Op:
    """One client request as a Jepsen history sees it: ok, fail (definitely not done) or
    info (no answer: possibly done, never counted as not done)."""

    kind: str
    protocol: str
    order_id: str | None = None
    status: str | None = None


def _client(
    admin: dict[str, str], accounts: list[str], skus: list[str], seed: int, until: float
) -> list[Op]:
    rng = random.Random(seed)
    ops: list[Op] = []
    with httpx.Client(base_url=GATEWAY, timeout=15) as http:
        while time.monotonic() < until:
            protocol = rng.choice(("2pc", "saga"))
            # Some orders are bound to fail: more than the stock of GEAR, or a big one.
            items = [{"sku": s, "quantity": rng.choice((1, 1, 2, 9))} for s in
                     rng.sample(skus, rng.choice((1, 2)))]  # fmt: skip
            try:
                got = http.post(
                    "/v1/orders",
                    headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
                    json={"account_id": rng.choice(accounts), "items": items,
                          "protocol": protocol},
                )  # fmt: skip
            except httpx.HTTPError:
                ops.append(Op("info", protocol))
                time.sleep(0.5)  # the gateway's pod is being replaced: no busy loop
                continue
            if got.status_code == 201:
                body = got.json()
                ops.append(Op("ok", protocol, body["id"], body["status"]))
            elif 400 <= got.status_code < 500 and got.status_code not in (408, 409, 429):
                ops.append(Op("fail", protocol))
            else:  # 5xx, 408, 409, 429: the gateway cannot say it was not done
                ops.append(Op("info", protocol))
            time.sleep(rng.uniform(0.0, 0.2))
    return ops


def _nemesis(cluster: Cluster, seed: int, until: float) -> list[str]:
    rng = random.Random(seed)
    deleted: list[str] = []
    while time.monotonic() + KILL_EVERY_SECONDS < until:
        time.sleep(KILL_EVERY_SECONDS)
        target = rng.choice(KILL_TARGETS)
        running = [
            p["metadata"]["name"] for p in pods(cluster, NS)
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == target
            and p["status"].get("phase") == "Running"
        ]  # fmt: skip
        if running:
            victim = rng.choice(running)
            cluster.kubectl(
                "-n", NS, "delete", "pod", victim, "--grace-period=0", "--force", "--wait=false"
            )  # fmt: skip
            deleted.append(victim)
    return deleted


def _seen(http: httpx.Client, admin: dict[str, str], accounts: list[str]) -> set[str]:
    """The orders that have at least one notification."""
    found: set[str] = set()
    for account in accounts:
        got = http.get(
            f"/v1/accounts/{account}/notifications", params={"limit": 500}, headers=admin
        )
        found |= {n["order_id"] for n in got.json()["notifications"]}
    return found


def prepared_transactions(cluster: Cluster) -> list[str]:
    out = cluster.kubectl(
        "-n", NS, "exec", "statefulset/dtx-postgresql", "--", "sh", "-c",
        'psql -U postgres -At -h /var/run/postgresql -c "SELECT gid FROM pg_prepared_xacts"',
    ).stdout  # fmt: skip
    return out.split()


def seed_shop(admin: dict[str, str]) -> tuple[list[str], list[str]]:
    """Accounts and products of their own for one load test: (account ids, skus)."""
    suffix = uuid.uuid4().hex[:6].upper()
    skus = [f"{name}-{suffix}" for name in KILL_PRODUCTS]
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        accounts = [
            http.post(
                "/v1/accounts", headers=admin,
                json={"owner": f"k{i}", "currency": "EUR", "balance_minor": KILL_BALANCE},
            ).json()["id"]
            for i in range(KILL_ACCOUNTS)
        ]  # fmt: skip
        for sku, (price, stock) in zip(skus, KILL_PRODUCTS.values(), strict=True):
            made = http.post(
                "/v1/products", headers=admin,
                json={"sku": sku, "name": sku, "price_minor": price, "stock": stock},
            )  # fmt: skip
            assert made.status_code == 201, made.text
    return accounts, skus


def run_load(
    admin: dict[str, str],
    accounts: list[str],
    skus: list[str],
    seed: int,
    nemesis: Callable[[float], list[str]],
) -> tuple[list[Op], list[str]]:
    """CLIENTS clients placing orders for LOAD_SECONDS while ``nemesis`` runs until the
    same deadline; the clients' history and what the nemesis did."""
    until = time.monotonic() + LOAD_SECONDS
    with concurrent.futures.ThreadPoolExecutor(CLIENTS + 1) as pool:
        clients = [
            pool.submit(_client, admin, accounts, skus, seed + i, until) for i in range(CLIENTS)
        ]
        done = pool.submit(nemesis, until)
        ops = [op for c in clients for op in c.result(timeout=LOAD_SECONDS + 300)]
        return ops, done.result(timeout=LOAD_SECONDS + 300)


def check_conserved(
    cluster: Cluster, admin: dict[str, str], accounts: list[str], skus: list[str], ops: list[Op]
) -> list[dict[str, Any]]:
    """The invariants after a load: every order terminal, money and stock conserved, no
    prepared transaction left, one notification per order. Returns the orders."""
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:

        def every_order_terminal() -> list[dict[str, Any]] | None:
            found: list[dict[str, Any]] = []
            for account in accounts:
                got = http.get("/v1/orders", params={"account_id": account, "limit": 500},
                               headers=admin)  # fmt: skip
                if got.status_code != 200:
                    return None
                page = got.json()["orders"]
                assert len(page) < 500, "more orders than one page: raise the limit"
                found += page
            return found if all(o["status"] != "pending" for o in found) else None

        orders: list[dict[str, Any]] = eventually(
            every_order_terminal, "every order terminal", timeout=240
        )

        def read(path: str) -> dict[str, Any]:
            # After pods were replaced the gateway's channel may still be in its reconnect
            # backoff: a 503 is waited out (bounded); the state read is what is checked.
            def answered() -> httpx.Response | None:
                got = http.get(path, headers=admin)
                return got if got.status_code != 503 else None

            got = eventually(answered, f"GET {path} answered", timeout=120)
            assert got.status_code == 200, (path, got.status_code, got.text)
            body: dict[str, Any] = got.json()
            return body

        balances = {a: read(f"/v1/accounts/{a}")["balance_minor"] for a in accounts}
        products = {s: read(f"/v1/products/{s}") for s in skus}
        known = {o["id"]: o for o in orders}
        # Every order a client saw placed exists; what got no answer may or may not.
        for op in ops:
            if op.kind == "ok":
                assert op.order_id in known, f"an acknowledged order vanished: {op}"
        confirmed = [o for o in orders if o["status"] == "confirmed"]
        charged = sum(o["total_minor"] for o in confirmed)
        assert all(b >= 0 for b in balances.values())
        assert sum(balances.values()) + charged == KILL_ACCOUNTS * KILL_BALANCE, "money"
        for sku, (_, stock) in zip(skus, KILL_PRODUCTS.values(), strict=True):
            wanted = sum(i["quantity"] for o in confirmed for i in o["items"] if i["sku"] == sku)
            p = products[sku]
            assert p["available"] >= 0
            assert p["reserved"] >= 0
            assert p["available"] + p["reserved"] == stock, f"{sku} not conserved: {p}"
            assert p["reserved"] == wanted, f"{sku}: reserved {p['reserved']}, orders {wanted}"
        assert prepared_transactions(cluster) == [], "prepared transactions left behind"

        def one_notification_each() -> dict[str, int] | None:
            seen: dict[str, int] = {}
            for account in accounts:
                got = http.get(
                    f"/v1/accounts/{account}/notifications", params={"limit": 500}, headers=admin
                )
                for n in got.json()["notifications"]:
                    seen[n["order_id"]] = seen.get(n["order_id"], 0) + 1
            return seen if set(seen) >= set(known) else None

        try:
            notified = eventually(one_notification_each, "a notification per order", timeout=180)
        except AssertionError:
            seen = _seen(http, admin, accounts)
            missing = [
                {k: known[i][k] for k in ("status", "protocol", "reason", "created_at")}
                for i in set(known) - seen
            ]
            raise AssertionError(f"orders without a notification: {missing}") from None
        assert {k: v for k, v in notified.items() if v != 1} == {}, "duplicate notifications"
    return orders


def test_deleted_pods_under_load_conserve_money_and_stock(
    installed: Cluster, admin: dict[str, str]
) -> None:
    seed = int(os.environ.get("DTX_KILL_SEED", str(random.randrange(1 << 30))))
    print(f"kill test seed {seed} (DTX_KILL_SEED reruns it)")
    accounts, skus = seed_shop(admin)
    ops, deleted = run_load(
        admin, accounts, skus, seed, lambda until: _nemesis(installed, seed, until)
    )
    assert deleted, "the nemesis deleted no pod"
    installed.kubectl("-n", NS, "rollout", "status", "deployment", "--timeout=300s", timeout=320)
    orders = check_conserved(installed, admin, accounts, skus, ops)
    counts = {kind: sum(op.kind == kind for op in ops) for kind in ("ok", "fail", "info")}
    statuses = {s: sum(o["status"] == s for o in orders) for s in {o["status"] for o in orders}}
    print(
        f"kill test: {len(ops)} requests {counts}, {len(orders)} orders {statuses}, "
        f"{len(deleted)} pods deleted ({', '.join(deleted)}), 0 violations"
    )


def _ready_count(cluster: Cluster, component: str) -> int:
    return sum(
        1 for p in pods(cluster, NS)
        if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        and ready(p) and not p["metadata"].get("deletionTimestamp")
    )  # fmt: skip


def _rolling_restarts(cluster: Cluster, until: float) -> list[str]:
    """Restart the coordinators and the orchestrators (two replicas each, a PDB of
    maxUnavailable 1) while sampling how many of each stay Ready."""
    least = {"coordinator": 2, "saga": 2}
    time.sleep(5)
    cluster.kubectl("-n", NS, "rollout", "restart", "deployment/dtx-coordinator",
                    "deployment/dtx-saga")  # fmt: skip
    restarted = time.monotonic()
    while time.monotonic() < until or time.monotonic() - restarted < 30:
        for component in least:
            least[component] = min(least[component], _ready_count(cluster, component))
        status = cluster.kubectl(
            "-n", NS, "rollout", "status", "deployment/dtx-coordinator", "--timeout=1s",
            check=False,
        )  # fmt: skip
        if status.returncode == 0 and time.monotonic() >= until:
            break
        time.sleep(0.5)
    return [f"{component}>={n}" for component, n in least.items()]


def test_rolling_restarts_under_load_keep_every_outcome(
    installed: Cluster, admin: dict[str, str]
) -> None:
    seed = random.randrange(1 << 30)
    accounts, skus = seed_shop(admin)
    before = {
        component: {
            p["metadata"]["name"] for p in pods(installed, NS)
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        }
        for component in ("coordinator", "saga")
    }  # fmt: skip
    ops, least_ready = run_load(
        admin, accounts, skus, seed, lambda until: _rolling_restarts(installed, until)
    )
    for deployment in ("dtx-coordinator", "dtx-saga"):
        installed.kubectl("-n", NS, "rollout", "status", f"deployment/{deployment}",
                          "--timeout=300s", timeout=320)  # fmt: skip
    # The PDBs (maxUnavailable 1) and the rollout kept at least one of each Ready
    # throughout (the rollout's surge keeps two here), and every pod was replaced.
    assert all(int(entry.split(">=")[1]) >= 1 for entry in least_ready), least_ready
    for component in ("coordinator", "saga"):
        now = {
            p["metadata"]["name"] for p in pods(installed, NS)
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        }  # fmt: skip
        assert now.isdisjoint(before[component]), (component, now, before[component])
    orders = check_conserved(installed, admin, accounts, skus, ops)
    # For the notes: how many requests the restarts cost an answer.
    counts = {kind: sum(op.kind == kind for op in ops) for kind in ("ok", "fail", "info")}
    print(f"rolling restarts: {len(ops)} requests {counts}, {len(orders)} orders, "
          f"ready throughout {least_ready}")  # fmt: skip
