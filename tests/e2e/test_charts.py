"""The Helm charts (charts/dtx, charts/dtx-crds, observability/chart) with the pinned helm and
a real API server (dtx_infra.kube.ControlPlane), and the image's build steps.

- lint --strict and template: default values and every charts/dtx/ci/*.yaml;
- values.schema.json refuses an unknown key, a wrong type, a value out of bounds;
- every rendered pod meets the restricted Pod Security Standard, every component has the
  NetworkPolicy of its real call graph;
- the real API server accepts every rendering (server-side dry run, in namespaces that
  enforce the restricted standard), then `helm install` of the CRD chart, the app chart and
  the observability chart: every object exists, the ReplicaSet and StatefulSet controllers
  create every pod (PodSecurity admission admits them), the CRD is served and the default
  TransactionPolicy exists; the operator, run as a real process with nothing but the
  chart's ServiceAccount token, makes it Ready;
- the PostgreSQL init script of the chart, run against a real PostgreSQL, makes one role
  and one database per service, in which PREPARE TRANSACTION works;
- the image's venv, built the Dockerfile's way (uv sync from uv.lock, no dev, no editable),
  runs `dtx` and the operator.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from dtx_infra.kube import REPO_ROOT, ControlPlane, KubeBinaries, built_binaries
from dtx_infra.pg_binaries import find_pg_binaries
from tests.support.kube_harness import (
    AdminApi,
    OperatorProcess,
    eventually,
    service_account_kubeconfig,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * 3600)]

APP = REPO_ROOT / "charts" / "dtx"
CRDS = REPO_ROOT / "charts" / "dtx-crds"
OBS = REPO_ROOT / "observability" / "chart"
CI_VALUES = sorted((APP / "ci").glob("*.yaml"))
POLICY_API = "dtx.dev/v1alpha1/TransactionPolicy"
NS, OBS_NS = "dtx", "observability"
# The observability chart's trace stores (tracing.backend): helm args of each.
OBS_BACKENDS = {"tempo": [], "jaeger": ["--set", "tracing.backend=jaeger"]}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.fixture(scope="module")
def binaries() -> KubeBinaries:
    return built_binaries()


def helm(
    binaries: KubeBinaries, *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(binaries.helm), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # No repositories, no plugins, no cache of a developer's helm: only what we give it.
        env={
            **os.environ,
            "HELM_CACHE_HOME": "/nonexistent-helm-cache",
            "HELM_CONFIG_HOME": "/nonexistent-helm-config",
            "HELM_DATA_HOME": "/nonexistent-helm-data",
        },
    )
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result


def render(binaries: KubeBinaries, chart: Path, *args: str, release: str = "dtx") -> str:
    namespace = OBS_NS if chart == OBS else NS
    return helm(binaries, "template", release, str(chart), "-n", namespace, *args).stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def app_renderings() -> list[tuple[str, list[str]]]:
    """(name, helm args) of each app-chart rendering under test."""
    return [
        ("default", []),
        ("default+crd", ["--api-versions", POLICY_API]),
        *((f.name, ["-f", str(f), "--api-versions", POLICY_API]) for f in CI_VALUES),
    ]


RENDERINGS = app_renderings()


# -- lint and template ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chart", "values"),
    [(APP, None), *((APP, f) for f in CI_VALUES), (CRDS, None), (OBS, None)],
    ids=lambda x: x.name if isinstance(x, Path) else "default",
)
def test_lint_strict(binaries: KubeBinaries, chart: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(chart), *(["-f", str(values)] if values else [])]
    out = helm(binaries, *args).stdout
    assert "0 chart(s) failed" in out, out


def test_lint_strict_observability_with_jaeger(binaries: KubeBinaries) -> None:
    out = helm(binaries, "lint", "--strict", str(OBS), *OBS_BACKENDS["jaeger"]).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize(("name", "args"), RENDERINGS, ids=[r[0] for r in RENDERINGS])
def test_app_chart_renders(binaries: KubeBinaries, name: str, args: list[str]) -> None:
    rendered = objects(render(binaries, APP, *args))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    minimal = name == "minimal-values.yaml"
    for service in ("coordinator", "saga", "payments", "inventory", "orders", "gateway"):
        assert ("Deployment", f"dtx-{service}") in kinds
        assert ("Service", f"dtx-{service}") in kinds
        assert ("ServiceAccount", f"dtx-{service}") in kinds
    assert (("StatefulSet", "dtx-postgresql") in kinds) is not minimal
    assert (("StatefulSet", "dtx-kafka") in kinds) is not minimal
    assert (("Deployment", "dtx-operator") in kinds) is not minimal
    policy = ("TransactionPolicy", "default") in kinds
    assert policy is (name not in ("default", "minimal-values.yaml"))
    if not minimal:
        assert ("PodDisruptionBudget", "dtx-coordinator") in kinds
        assert ("PodDisruptionBudget", "dtx-saga") in kinds


def test_other_charts_render(binaries: KubeBinaries) -> None:
    [crd] = objects(render(binaries, CRDS))
    assert crd["kind"] == "CustomResourceDefinition"
    kinds = {
        (o["kind"], o["metadata"]["name"])
        for o in objects(render(binaries, OBS, release="dtx-observability"))
    }
    for name in ("tempo", "prometheus", "grafana"):
        assert ("Deployment", f"dtx-observability-{name}") in kinds
        assert ("Service", f"dtx-observability-{name}") in kinds
    assert ("ConfigMap", "dtx-observability-grafana-dashboards") in kinds
    assert ("ConfigMap", "dtx-observability-prometheus-rules") in kinds
    # Tempo is the default trace store: nothing of Jaeger's.
    assert not [k for k in kinds if "jaeger" in k[1]], kinds


def trace_store_ports(backend: str) -> dict[str, int]:
    values = yaml.safe_load((OBS / "values.yaml").read_text())[backend]
    return {k: v for k, v in values.items() if k.endswith("Port")}


@pytest.mark.parametrize(
    ("backend", "args"),
    [
        *OBS_BACKENDS.items(),
        ("none", ["--set", "tracing.backend=jaeger", "--set", "jaeger.enabled=false"]),
    ],
    ids=[*OBS_BACKENDS, "jaeger-disabled"],
)
def test_observability_chart_renders_the_chosen_trace_store(
    binaries: KubeBinaries, backend: str, args: list[str]
) -> None:
    """tracing.backend picks Tempo or Jaeger: its objects render, the other's do not, and
    Grafana's trace data source (and the exemplars' link) is the chosen one."""
    rendered = objects(render(binaries, OBS, *args, release="dtx-observability"))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    for store in ("tempo", "jaeger"):
        objs = {k for k in kinds if k[1] == f"dtx-observability-{store}"}
        if store == backend:
            assert objs == {
                (kind, f"dtx-observability-{store}")
                for kind in ("ConfigMap", "ServiceAccount", "Deployment", "Service")
            }
        else:
            assert not objs
            assert not [k for k in kinds if store in k[1]], kinds
    grafana = by_kind(rendered, "ConfigMap")["dtx-observability-grafana-provisioning"]
    sources = {
        d["uid"]: d for d in yaml.safe_load(grafana["data"]["datasources.yaml"])["datasources"]
    }
    exemplars = sources["prometheus"]["jsonData"].get("exemplarTraceIdDestinations", [])
    if backend == "none":
        assert set(sources) == {"prometheus"}
        assert not exemplars
        return
    assert set(sources) == {"prometheus", backend}
    ports = trace_store_ports(backend)
    assert sources[backend]["type"] == backend
    assert sources[backend]["url"] == (
        f"http://dtx-observability-{backend}.{OBS_NS}.svc.cluster.local:{ports['httpPort']}"
    )
    assert {e["datasourceUid"] for e in exemplars} == {backend}
    # The services' OTLP endpoint is <release>-<backend>:4317 either way (and charts/dtx's
    # NetworkPolicy opens 4317 and 4318).
    service = by_kind(rendered, "Service")[f"dtx-observability-{backend}"]
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} >= {
        ("otlp-grpc", 4317),
        ("otlp-http", 4318),
        ("http", ports["httpPort"]),
    }


def test_jaeger_configuration(binaries: KubeBinaries) -> None:
    """The Jaeger v2 configuration the chart renders: OTLP in, a bounded in-memory store,
    the query API, a health check the probes use, its metrics scraped."""
    rendered = objects(render(binaries, OBS, *OBS_BACKENDS["jaeger"], release="dtx-observability"))
    ports = trace_store_ports("jaeger")
    cm = by_kind(rendered, "ConfigMap")["dtx-observability-jaeger"]
    config = yaml.safe_load(cm["data"]["jaeger.yaml"])
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == f"0.0.0.0:{ports['otlpGrpcPort']}"
    assert protocols["http"]["endpoint"] == f"0.0.0.0:{ports['otlpHttpPort']}"
    extensions = config["extensions"]
    [backend] = extensions["jaeger_storage"]["backends"].values()
    assert backend == {"memory": {"max_traces": 10000}}
    assert extensions["jaeger_query"]["http"]["endpoint"] == f"0.0.0.0:{ports['httpPort']}"
    assert extensions["jaeger_query"]["enable_tracing"] is False  # no spans of its own
    health = extensions["healthcheckv2"]
    assert health["use_v2"] is True
    assert health["http"]["endpoint"] == f"0.0.0.0:{ports['healthPort']}"
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert pipeline["exporters"] == ["jaeger_storage_exporter"]
    assert set(config["service"]["extensions"]) == {
        "jaeger_storage",
        "jaeger_query",
        "healthcheckv2",
    }
    deployment = by_kind(rendered, "Deployment")["dtx-observability-jaeger"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == "jaegertracing/jaeger:2.12.0"
    assert container["args"] == ["--config=/conf/jaeger.yaml"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["health"] == ports["healthPort"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/status", "port": "health"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metricsPort"])
    assert named["metrics"] == ports["metricsPort"]


@pytest.mark.parametrize(
    ("set_args", "message"),
    [
        (["--set", "services.orders.replicass=2"], "additional properties 'replicass' not allowed"),
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set-string", "services.orders.replicas=two"], "got string, want integer"),
        (["--set", "postgresql.maxPreparedTransactions=0"], "minimum: got 0, want 1"),
        (["--set", "logLevel=LOUD"], "value must be one of"),
        (
            ["--set", "defaultPolicy.spec.protocol=ThreePhase"],
            "value must be one of 'TwoPhaseCommit', 'Saga'",
        ),
        (
            ["--set", "defaultPolicy.spec.timeouts.prepareMS=5"],
            "additional properties 'prepareMS' not allowed",
        ),
        (["--set", "services.gateway.calls[0]=mailer"], "value must be one of"),
        (["--set", "image.digest=latest"], "does not match pattern"),
    ],
    ids=[
        "unknown-key",
        "unknown-top-level",
        "wrong-type",
        "out-of-bounds",
        "enum",
        "policy-enum",
        "policy-typo",
        "call-graph",
        "digest",
    ],
)
def test_schema_refuses(binaries: KubeBinaries, set_args: list[str], message: str) -> None:
    result = helm(binaries, "template", "dtx", str(APP), *set_args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("set_arg", "message"),
    [
        ("tempo.retension=1h", "additional properties 'retension' not allowed"),
        ("jaeger.maxTrace=10", "additional properties 'maxTrace' not allowed"),
        ("tracing.sampler=1", "additional properties 'sampler' not allowed"),
        ("tracing.backend=zipkin", "value must be one of 'tempo', 'jaeger'"),
        ("jaeger.maxTraces=0", "minimum: got 0, want 1"),
        ("jaeger.healthPort=70000", "maximum: got 70,000, want 65,535"),
    ],
    ids=[
        "tempo-unknown-key",
        "jaeger-unknown-key",
        "tracing-unknown-key",
        "unknown-backend",
        "unbounded-store",
        "port",
    ],
)
def test_observability_schema_refuses(binaries: KubeBinaries, set_arg: str, message: str) -> None:
    result = helm(binaries, "template", "o", str(OBS), "--set", set_arg, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_external_database_is_required_without_postgresql(binaries: KubeBinaries) -> None:
    result = helm(
        binaries, "template", "dtx", str(APP), "--set", "postgresql.enabled=false", check=False
    )
    assert result.returncode != 0
    assert "externalDatabase.urls.coordinator" in result.stderr, result.stderr


# -- what the rendered objects promise ---------------------------------------------------------


def pod_specs(rendered: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in rendered:
        if obj["kind"] in WORKLOADS:
            spec = obj["spec"]["template"]["spec"]
            if obj["kind"] == "CronJob":
                spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec


def assert_restricted(where: str, spec: dict[str, Any], read_only: bool = True) -> None:
    pod = spec.get("securityContext") or {}
    assert pod.get("runAsNonRoot") is True, where
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host_namespace), where
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {volume['name']} is {kinds}"
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    for container in containers:
        what = f"{where} container {container['name']}"
        sc = container.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True, what
        assert sc.get("allowPrivilegeEscalation") is False, what
        assert sc.get("privileged") in (None, False), what
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
        assert not sc.get("capabilities", {}).get("add"), what
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
        assert sc.get("readOnlyRootFilesystem") is read_only, what
        assert (sc.get("runAsUser") or pod.get("runAsUser") or 1) != 0, what
        assert all("hostPort" not in p for p in container.get("ports", [])), what
        assert container.get("resources", {}).get("requests"), f"{what}: no resource requests"
        assert container.get("resources", {}).get("limits", {}).get("memory"), (
            f"{what}: no memory limit"
        )
        if read_only:
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts or container["name"] == "wait-for-policy", (
                f"{what}: no writable /tmp"
            )


@pytest.mark.parametrize(("name", "args"), RENDERINGS, ids=[r[0] for r in RENDERINGS])
def test_every_pod_is_restricted(binaries: KubeBinaries, name: str, args: list[str]) -> None:
    rendered = objects(render(binaries, APP, *args))
    specs = list(pod_specs(rendered))
    assert len(specs) >= 7
    for where, spec in specs:
        assert_restricted(where, spec)
        assert spec.get("automountServiceAccountToken") is (where == "Deployment/dtx-operator"), (
            where
        )


@pytest.mark.parametrize("backend", list(OBS_BACKENDS))
def test_observability_pods_are_restricted(binaries: KubeBinaries, backend: str) -> None:
    rendered = objects(render(binaries, OBS, *OBS_BACKENDS[backend], release="dtx-observability"))
    specs = list(pod_specs(rendered))
    assert {where for where, _ in specs} == {
        f"Deployment/dtx-observability-{name}" for name in (backend, "prometheus", "grafana")
    }
    for where, spec in specs:
        assert_restricted(where, spec)


def test_skaffold_dev_values_relax_only_the_root_filesystem(binaries: KubeBinaries) -> None:
    args = ["--set", "security.readOnlyRootFilesystem=false", "--set", "dev.restartOnSync=true"]
    for where, spec in pod_specs(objects(render(binaries, APP, *args))):
        dtx_image = spec["containers"][0]["image"].startswith("dtx:")
        if dtx_image:
            spec = {**spec, "initContainers": []}
        assert_restricted(where, spec, read_only=not dtx_image)


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def by_kind(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered if o["kind"] == kind}


def test_services_are_wired_like_the_local_system(binaries: KubeBinaries) -> None:
    rendered = objects(render(binaries, APP, "--api-versions", POLICY_API))
    deployments = by_kind(rendered, "Deployment")
    values = yaml.safe_load((APP / "values.yaml").read_text())
    svc = "svc.cluster.local:50051"
    for name, service in values["services"].items():
        env = env_of(deployments[f"dtx-{name}"])
        assert env["DTX_GRPC_PORT"] == "50051"
        assert env["DTX_HTTP_PORT"] == "9464"
        assert env["DTX_REPLICA_ID"] == "$(POD_NAME)"
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        for callee in service["calls"]:
            assert env[f"DTX_{callee.upper()}_ENDPOINT"] == f"dtx-{callee}.dtx.{svc}"
        assert ("DTX_DATABASE_URL" in env) is service["database"]
        if service["database"]:
            assert env["DTX_DATABASE_URL"] == {
                "secretKeyRef": {"name": f"dtx-{name}-db", "key": "url"}
            }
        assert ("DTX_KAFKA_BOOTSTRAP" in env) is service["kafka"]
        if service["policy"]:
            assert env["DTX_POLICY_FILE"] == "/etc/dtx/policy/policy.json"
            assert env["DTX_PARTICIPANTS"] == ",".join(
                f"{p}=dtx-{p}.dtx.{svc}" for p in ("inventory", "orders", "payments")
            )
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    gateway = env_of(deployments["dtx-gateway"])
    assert gateway["DTX_JWT_SECRET"] == {
        "secretKeyRef": {"name": "dtx-gateway-jwt", "key": "secret"}
    }
    assert gateway["DTX_GATEWAY_PORT"] == "8080"
    jwt = by_kind(rendered, "Secret")["dtx-gateway-jwt"]
    assert len(jwt["stringData"]["secret"]) >= 32


def test_probes_grpc_for_grpc_services_http_for_the_gateway(binaries: KubeBinaries) -> None:
    deployments = by_kind(objects(render(binaries, APP)), "Deployment")
    for name, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        if name == "dtx-operator":
            assert container["livenessProbe"]["httpGet"] == {
                "path": "/healthz",
                "port": "http-health",
            }
        elif name == "dtx-gateway":
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        else:
            assert container["readinessProbe"]["grpc"] == {"port": 50051}, name
            assert container["startupProbe"]["grpc"] == {"port": 50051}, name
            assert container["livenessProbe"]["httpGet"] == {
                "path": "/healthz",
                "port": "http-metrics",
            }, name


def test_policy_is_mounted_only_when_it_will_exist(binaries: KubeBinaries) -> None:
    without = by_kind(objects(render(binaries, APP)), "Deployment")["dtx-coordinator"]
    assert "DTX_POLICY_FILE" not in env_of(without)
    with_crd = objects(render(binaries, APP, "--api-versions", POLICY_API))
    coordinator = by_kind(with_crd, "Deployment")["dtx-coordinator"]
    pod = coordinator["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "policy"]
    assert volume["configMap"] == {
        "name": "default-policy",
        "optional": True,
        "items": [{"key": "policy.json", "path": "policy.json"}],
    }
    [policy] = [o for o in with_crd if o["kind"] == "TransactionPolicy"]
    assert policy["spec"]["selector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["coordinator", "saga"]}
    ]
    annotations = coordinator["spec"]["template"]["metadata"]["annotations"]
    assert annotations["dtx.dev/status-port"] == "9464"
    # The init container waits (bounded) for the operator's file: run its code for real.
    [init] = pod["initContainers"]
    code = init["command"][2]
    assert init["command"][3:] == ["/etc/dtx/policy/policy.json", "120"]
    missing = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent/policy.json", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert missing.stdout.strip() == "still no /nonexistent/policy.json"
    found = subprocess.run(
        [sys.executable, "-c", code, __file__, "30"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert found.stdout.startswith("found ")


def selectors(peers: list[dict[str, Any]]) -> set[str]:
    return {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in peers
        if "podSelector" in p and "matchLabels" in p["podSelector"] and "namespaceSelector" not in p
    }


def test_network_policies_follow_the_call_graph(binaries: KubeBinaries) -> None:
    rendered = objects(render(binaries, APP, "--set", "telemetry.enabled=true"))
    policies = by_kind(rendered, "NetworkPolicy")
    deny = policies["dtx-default-deny"]["spec"]
    assert deny == {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "dtx", "app.kubernetes.io/instance": "dtx"}
        },
        "policyTypes": ["Ingress", "Egress"],
    }
    values = yaml.safe_load((APP / "values.yaml").read_text())
    services = values["services"]
    for name, service in services.items():
        spec = policies[f"dtx-{name}"]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        grpc_in = [
            r
            for r in spec.get("ingress", [])
            if r.get("ports") == [{"port": 50051, "protocol": "TCP"}]
        ]
        callers = {c for c, s in services.items() if name in s["calls"]}
        assert selectors(grpc_in[0]["from"] if grpc_in else []) == callers, name
        grpc_out = [
            r for r in spec["egress"] if r.get("ports") == [{"port": 50051, "protocol": "TCP"}]
        ]
        assert selectors(grpc_out[0]["to"] if grpc_out else []) == set(service["calls"]), name
        egress_ports = {p["port"] for r in spec["egress"] for p in r["ports"]}
        assert 53 in egress_ports, name
        assert (5432 in egress_ports) is service["database"], name
        assert (9092 in egress_ports) is service["kafka"], name
        assert 4317 in egress_ports, name  # telemetry
        metrics_in = [
            r
            for r in spec.get("ingress", [])
            if r.get("ports") == [{"port": 9464, "protocol": "TCP"}]
        ]
        froms = [p for r in metrics_in for p in r["from"]]
        assert any(p.get("namespaceSelector") for p in froms), f"{name}: Prometheus may not scrape"
        assert ("operator" in selectors(froms)) is service["policy"], name
        rest_in = [
            r
            for r in spec.get("ingress", [])
            if r.get("ports") == [{"port": 8080, "protocol": "TCP"}]
        ]
        assert bool(rest_in) is service["rest"]["enabled"], name
    operator = policies["dtx-operator"]["spec"]
    assert operator["ingress"] == []
    status = [r for r in operator["egress"] if r["ports"] == [{"port": 9464, "protocol": "TCP"}]]
    assert selectors(status[0]["to"]) == {"coordinator", "saga"}
    assert {p["port"] for r in operator["egress"] for p in r["ports"]} >= {443, 6443}
    postgres = policies["dtx-postgresql"]["spec"]
    assert selectors(postgres["ingress"][0]["from"]) == {
        n for n, s in services.items() if s["database"]
    }
    assert postgres["egress"] == []
    kafka = policies["dtx-kafka"]["spec"]
    assert selectors(kafka["ingress"][0]["from"]) == {
        n for n, s in services.items() if s["kafka"]
    } | {"kafka"}


def test_no_network_policies_when_disabled(binaries: KubeBinaries) -> None:
    rendered = objects(
        render(binaries, APP, "-f", str(APP / "ci" / "no-networkpolicy-values.yaml"))
    )
    assert not by_kind(rendered, "NetworkPolicy")


# -- a real API server -----------------------------------------------------------------------


def kubeconfig_args(cp: ControlPlane) -> list[str]:
    return ["--kubeconfig", str(cp.kubeconfig)]


@pytest.fixture(scope="module")
def cp(binaries: KubeBinaries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("kube"), binaries) as plane:
        for namespace in (NS, OBS_NS):
            plane.kubectl("create", "namespace", namespace)
            # PodSecurity admission refuses every pod that is not restricted.
            plane.kubectl(
                "label",
                "namespace",
                namespace,
                "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/warn=restricted",
            )

        def has_default_sa(namespace: str) -> bool:
            found = plane.kubectl("-n", namespace, "get", "sa", "default", check=False)
            return found.returncode == 0

        for namespace in (NS, OBS_NS):
            eventually(
                functools.partial(has_default_sa, namespace),
                f"serviceaccount default in {namespace}",
            )
        # The CRD chart for real, first (server-side dry runs of a TransactionPolicy need it).
        helm(binaries, "install", "dtx-crds", str(CRDS), "-n", NS, *kubeconfig_args(plane))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "crd/transactionpolicies.dtx.dev",
            "--timeout=60s",
        )
        yield plane


def dry_run_server(cp: ControlPlane, manifests: str) -> subprocess.CompletedProcess[str]:
    return cp.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests, check=False)


@pytest.mark.parametrize(("name", "args"), RENDERINGS, ids=[r[0] for r in RENDERINGS])
def test_api_server_accepts_app_chart(
    cp: ControlPlane, binaries: KubeBinaries, name: str, args: list[str]
) -> None:
    manifests = render(binaries, APP, *args)
    result = dry_run_server(cp, manifests)
    assert result.returncode == 0, result.stderr
    assert "PodSecurity" not in result.stderr, result.stderr
    assert len(result.stdout.splitlines()) == len(objects(manifests))


def test_api_server_accepts_crd_and_observability_charts(
    cp: ControlPlane, binaries: KubeBinaries
) -> None:
    renderings: list[tuple[Path, str, list[str]]] = [
        (CRDS, "dtx-crds", []),
        *((OBS, "dtx-observability", args) for args in OBS_BACKENDS.values()),
    ]
    for chart, release, args in renderings:
        manifests = render(binaries, chart, *args, release=release)
        result = dry_run_server(cp, manifests)
        assert result.returncode == 0, result.stderr
        assert "PodSecurity" not in result.stderr, result.stderr


def test_the_api_server_refuses_what_the_chart_would_not_render(
    cp: ControlPlane, binaries: KubeBinaries
) -> None:
    """A control for the dry runs above: a pod that is not restricted is refused here."""
    manifests = render(binaries, APP, "--show-only", "templates/components.yaml")
    deployments = [o for o in objects(manifests) if o["kind"] == "Deployment"]
    spec: dict[str, Any] = {
        **deployments[0]["spec"]["template"]["spec"],
        "securityContext": {},
        "serviceAccountName": "default",
    }
    spec["containers"] = [
        {**spec["containers"][0], "securityContext": {"allowPrivilegeEscalation": True}}
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": NS},
        "spec": spec,
    }
    result = dry_run_server(cp, json.dumps(pod))
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def installed(cp: ControlPlane, binaries: KubeBinaries) -> ControlPlane:
    """helm install of the app chart and the observability chart (the CRD chart is in)."""
    helm(binaries, "install", "dtx", str(APP), "-n", NS, *kubeconfig_args(cp), timeout=300)
    helm(
        binaries,
        "install",
        "dtx-observability",
        str(OBS),
        "-n",
        OBS_NS,
        *kubeconfig_args(cp),
        timeout=300,
    )
    return cp


def manifest_objects(
    cp: ControlPlane, binaries: KubeBinaries, release: str, namespace: str
) -> list[dict[str, Any]]:
    text = helm(binaries, "get", "manifest", release, "-n", namespace, *kubeconfig_args(cp)).stdout
    return objects(text)


@pytest.mark.parametrize(
    ("release", "namespace"), [("dtx-crds", NS), ("dtx", NS), ("dtx-observability", OBS_NS)]
)
def test_helm_install_creates_every_object(
    installed: ControlPlane, binaries: KubeBinaries, release: str, namespace: str
) -> None:
    wanted = manifest_objects(installed, binaries, release, namespace)
    assert wanted
    found = installed.kubectl("get", "-f", "-", "-o", "name", input=yaml.safe_dump_all(wanted))
    assert len(found.stdout.split()) == len(wanted)
    status = json.loads(
        helm(
            binaries, "status", release, "-n", namespace, "-o", "json", *kubeconfig_args(installed)
        ).stdout
    )
    assert status["info"]["status"] == "deployed"


def test_the_crd_is_served_and_the_default_policy_exists(installed: ControlPlane) -> None:
    table = installed.kubectl("-n", NS, "get", "txp").stdout
    assert table.splitlines()[1].split()[:3] == ["default", "TwoPhaseCommit", "256"]


def test_every_pod_is_admitted_as_restricted(
    installed: ControlPlane, binaries: KubeBinaries
) -> None:
    """No kubelet runs, but the controllers create the pods: PodSecurity (restricted) admits them."""
    for release, namespace in (("dtx", NS), ("dtx-observability", OBS_NS)):
        expected = 0
        for obj in manifest_objects(installed, binaries, release, namespace):
            if obj["kind"] in ("Deployment", "StatefulSet"):
                expected += obj["spec"].get("replicas", 1)

        def pods_created(ns: str = namespace, want: int = expected) -> bool:
            listed = json.loads(installed.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)
            return len(listed["items"]) == want

        eventually(pods_created, f"{expected} pods in {namespace}", timeout=90)
        events = installed.kubectl("-n", namespace, "get", "events", "-o", "json").stdout
        refused = [
            e["message"]
            for e in json.loads(events)["items"]
            if "PodSecurity" in e.get("message", "")
        ]
        assert not refused, refused


def test_operator_with_the_charts_service_account_makes_the_policy_ready(
    installed: ControlPlane, tmp_path: Path
) -> None:
    api = AdminApi(installed)
    kubeconfig = service_account_kubeconfig(installed, NS, "dtx-operator", tmp_path / "kubeconfig")
    operator = OperatorProcess(kubeconfig, NS, tmp_path / "operator.log").start()
    try:

        def ready() -> dict[str, Any] | None:
            txp = api.get(f"/apis/dtx.dev/v1alpha1/namespaces/{NS}/transactionpolicies/default")
            conditions = {
                c["type"]: c for c in ((txp or {}).get("status") or {}).get("conditions", [])
            }
            return txp if conditions.get("Ready", {}).get("status") == "True" else None

        txp = eventually(ready, "TransactionPolicy default Ready", timeout=60)
    finally:
        operator.stop()
    assert "Forbidden" not in operator.log(), operator.tail()
    cm = api.get(f"/api/v1/namespaces/{NS}/configmaps/default-policy")
    assert cm is not None
    document = json.loads(cm["data"]["policy.json"])
    assert document["protocol"] == "TwoPhaseCommit"
    assert document["maxInFlight"] == 256
    assert cm["metadata"]["annotations"]["dtx.dev/policy-hash"] == txp["status"]["policyHash"]
    # The coordinators' pods exist but none runs (no kubelet): selected, none in sync yet.
    assert txp["status"]["coordinators"] == 0


# -- the PostgreSQL init script, for real ---------------------------------------------------------


def test_postgres_init_script_makes_a_database_and_role_per_service(
    infra: Any, binaries: KubeBinaries, tmp_path: Path
) -> None:
    manifests = objects(render(binaries, APP, "--show-only", "templates/postgresql.yaml"))
    [init] = [o for o in manifests if o["kind"] == "ConfigMap"]
    script = tmp_path / "init.sh"
    script.write_text(init["data"]["10-dtx-databases.sh"])
    [statefulset] = [o for o in manifests if o["kind"] == "StatefulSet"]
    env_names = [e["name"] for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert {n for n in env_names if n.startswith("DTX_DB_PASSWORD_")} == {
        f"DTX_DB_PASSWORD_{s}"
        for s in ("COORDINATOR", "SAGA", "PAYMENTS", "INVENTORY", "ORDERS", "NOTIFICATIONS")
    }
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "max_prepared_transactions=256" in args

    postgres = infra.postgres
    binaries_pg = find_pg_binaries()
    assert binaries_pg is not None, "the local PostgreSQL's binaries (dtx infra) are installed"
    suffix = uuid.uuid4().hex[:8]
    names = [f"svc_{suffix}_a", f"svc_{suffix}_b"]
    passwords = {n: base64.b64encode(os.urandom(12)).decode() for n in names}
    env = {
        **os.environ,
        "PATH": f"{binaries_pg.bin_dir}:{os.environ['PATH']}",
        "POSTGRES_USER": postgres.user,
        "PGHOST": postgres.host,
        "PGPORT": str(postgres.port),
        **{f"DTX_DB_PASSWORD_{n.upper()}": pw for n, pw in passwords.items()},
    }
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )

    async def check() -> None:
        admin = await asyncpg.connect(postgres.dsn("postgres"), timeout=10)
        try:
            for name in names:
                owner = await admin.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name
                )
                assert owner == name
                public = "SELECT has_database_privilege('public', $1, 'CONNECT')"
                assert not await admin.fetchval(public, name)
                conn = await asyncpg.connect(
                    host=postgres.host,
                    port=postgres.port,
                    user=name,
                    password=passwords[name],
                    database=name,
                    timeout=10,
                )
                try:
                    assert await conn.fetchval("SELECT current_user") == name
                    await conn.execute("CREATE TABLE t (x int)")
                    await conn.execute(
                        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'dtx:init-test'"
                    )
                    await conn.execute("COMMIT PREPARED 'dtx:init-test'")
                    assert await conn.fetchval("SELECT count(*) FROM t") == 1
                finally:
                    await conn.close()
        finally:
            for name in names:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
                await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
            await admin.close()

    assert result.returncode == 0, result.stderr
    asyncio.run(check())
    assert result.stdout.count("database and role") == len(names)


# -- the image's venv, built the Dockerfile's way ---------------------------------------------------


def test_image_venv_from_the_lock_runs_dtx_and_the_operator(tmp_path: Path) -> None:
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    assert Path(uv).exists() or shutil.which(uv), "uv is installed by `make install`"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "services", src / "services", ignore=ignore)
    shutil.copytree(REPO_ROOT / "operator", src / "operator", ignore=ignore)
    venv = tmp_path / "venv"
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_LINK_MODE": "copy",
        "UV_PYTHON": str(Path(sys.base_prefix) / "bin" / "python3"),
    }
    env.pop("VIRTUAL_ENV", None)
    for args in (["--no-install-project"], []):
        subprocess.run(
            [uv, "sync", "--frozen", "--no-dev", "--no-editable", *args],
            cwd=src,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    # What the image's ENV sets; run from elsewhere so nothing of the repository leaks in.
    run_env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": f"{src / 'services'}:{src / 'operator'}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(tmp_path),
    }
    help_text = subprocess.run(
        ["dtx", "serve", "--help"],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "gateway" in help_text
    imported = subprocess.run(
        [
            "python",
            "-c",
            "import dtx_operator.handlers, dtx_cli.serve as m\n"
            "for s in m.SERVICES: m.load_service(s)\n"
            "import importlib.util as u\n"
            "print(u.find_spec('pytest') is None, u.find_spec('mypy') is None)",
        ],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == ["True", "True"], "dev dependencies must not be in the image"
    refused = subprocess.run(
        ["dtx", "serve", "nope"],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "unknown service" in refused.stderr
