"""The observability pieces against the real tools and the real services.

- the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`);
- every PromQL expression of the dashboards parses: each becomes a recording rule in a
  generated rules file that promtool checks (Grafana's $__rate_interval and the dashboard
  variables substituted);
- the chart's Prometheus configuration passes `promtool check config`;
- every metric the dashboards and rules name is exported by the real services: the whole
  system runs on loopback (with Kafka, the saga orchestrator, notifications and the
  gateway), takes a few orders, and each service's /metrics is read;
- one order placed through the gateway is ONE trace in a real Jaeger (v2, the chart's own
  configuration with tracing.backend=jaeger, run on loopback), with spans of the gateway,
  orders, the coordinator (or the saga orchestrator), each participant and, across Kafka,
  notifications.

promtool, helm and jaeger are built from pinned sources (toolchain/) by `make tools`
(`dtx toolchain build`) before the tests; a test only looks them up
(dtx_infra.toolchain.binary) and never builds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dtx_cli.processes import free_port
from dtx_gateway.auth import mint_token
from dtx_infra import toolchain
from dtx_infra.kube import REPO_ROOT
from dtx_runtime.outbox import delete_topics
from tests.support.dashboards import as_promql, dashboard_expressions
from tests.support.stack import Stack
from tests.support.traces import spans_by_service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * 3600)]

OBSERVABILITY = REPO_ROOT / "observability"
RULES = OBSERVABILITY / "rules" / "dtx-alerts.yaml"
RULE_TESTS = OBSERVABILITY / "rules" / "dtx-alerts.test.yaml"
SECRET = "e2e-observability-secret-0123456789abcdef"
TOPICS = ("dtx.orders", "dtx.payments", "dtx.inventory", "dtx.deadletter")
# Made by Prometheus itself, not by a dtx service.
NOT_FROM_SERVICES = {"up"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    return toolchain.binary("promtool")


def run(tool: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


# -- rules and expressions ------------------------------------------------------------------


def test_alert_rules_are_valid(promtool: Path) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests(promtool: Path) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_alerts_cover_the_failure_modes_and_each_is_tested() -> None:
    rules = alerts()
    metrics = {name: " ".join(re.findall(r"[a-z_]+", rule["expr"])) for name, rule in rules.items()}
    for needed in (
        "dtx_transaction_oldest_unfinished_age_seconds",
        "dtx_transactions_needs_intervention",
        "dtx_outbox_oldest_unsent_age_seconds",
        "up",
    ):
        assert any(needed in m.split() for m in metrics.values()), needed
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(rules) <= tested, f"alerts never seen firing in a test: {set(rules) - tested}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def check_as_rules(
    promtool: Path, exprs: list[str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return run(promtool, "check", "rules", str(path))


def test_every_dashboard_expression_parses(promtool: Path, tmp_path: Path) -> None:
    found = dashboard_expressions()
    assert len(found) > 40
    result = check_as_rules(promtool, [as_promql(e) for _, e in found], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(found)} rules found" in result.stdout, result.stdout


def test_the_expression_check_catches_a_broken_expression(promtool: Path, tmp_path: Path) -> None:
    """A control: the check above would fail on an expression that does not parse."""
    result = check_as_rules(promtool, ["sum by (service) (rate(dtx_x_total[5m])"], tmp_path)
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


def render_observability(*args: str) -> list[dict[str, Any]]:
    helm = toolchain.binary("helm")
    out = subprocess.run(
        [
            str(helm),
            "template",
            "dtx-observability",
            str(OBSERVABILITY / "chart"),
            "-n",
            "observability",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def configmap(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    [found] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    data: dict[str, str] = found["data"]
    return data


def test_the_charts_prometheus_configuration_is_valid(promtool: Path, tmp_path: Path) -> None:
    rendered = render_observability()
    config = tmp_path / "prometheus.yml"
    config.write_text(configmap(rendered, "dtx-observability-prometheus")["prometheus.yml"])
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for name, text in configmap(rendered, "dtx-observability-prometheus-rules").items():
        (rules_dir / name).write_text(text)
    assert (rules_dir / "dtx-alerts.yaml").read_text() == RULES.read_text()
    # The container's paths, here.
    config.write_text(config.read_text().replace("/etc/prometheus/rules/", f"{rules_dir}/"))
    result = run(promtool, "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout


# -- the real services ------------------------------------------------------------------------


def metrics_used() -> set[str]:
    texts = [e for _, e in dashboard_expressions()] + [r["expr"] for r in alerts().values()]
    return {m for t in texts for m in re.findall(r"\bdtx_[a-z0-9_]+", t)} - NOT_FROM_SERVICES


def exported_names(exposition: str) -> set[str]:
    """Metric names in a Prometheus text exposition: samples and HELP/TYPE lines (a labelled
    family with no child yet has only those), with a histogram's series names."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            parts = line.split()
            names.add(parts[2])
            if line.startswith("# TYPE ") and parts[3] == "histogram":
                names |= {parts[2] + s for s in ("_bucket", "_sum", "_count")}
            if (
                line.startswith("# TYPE ")
                and parts[3] == "counter"
                and not parts[2].endswith("_total")
            ):
                names.add(parts[2] + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@dataclass
class System:
    stack: Stack
    http: httpx.AsyncClient
    prefix: str

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(SECRET, 'admin', 'observability-test', 600)}"}

    def customer(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(SECRET, 'customer', account, 600)}"}

    async def account(self, balance: int) -> str:
        response = await self.http.post(
            "/v1/accounts",
            json={"owner": "Ada", "currency": "EUR", "balance_minor": balance},
            headers=self.admin(),
        )
        assert response.status_code == 201, response.text
        account: str = response.json()["id"]
        return account

    async def product(self, sku: str, price: int, stock: int) -> None:
        response = await self.http.post(
            "/v1/products",
            json={"sku": sku, "name": sku, "price_minor": price, "stock": stock},
            headers=self.admin(),
        )
        assert response.status_code == 201, response.text

    async def order(
        self, account: str, items: dict[str, int], protocol: str, trace_id: str | None = None
    ) -> httpx.Response:
        headers = {**self.customer(account), "Idempotency-Key": uuid.uuid4().hex}
        if trace_id:
            headers["traceparent"] = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
        return await self.http.post(
            "/v1/orders",
            json={
                "account_id": account,
                "items": [{"sku": s, "quantity": q} for s, q in items.items()],
                "protocol": protocol,
            },
            headers=headers,
        )


@contextlib.asynccontextmanager
async def whole_system(
    run_dir: Path, new_database: Callable[[str], str], infra: Any, **env: str
) -> AsyncIterator[System]:
    """Every service (saga, notifications and the gateway included) on loopback, with Kafka
    topics and a consumer group of its own."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    bootstrap = str(infra.kafka.bootstrap)
    port = free_port()
    stack = Stack(
        run_dir,
        new_database,
        with_saga=True,
        extra_services=("notifications", "gateway"),
        kafka_bootstrap=bootstrap,
        env={
            "DTX_JWT_SECRET": SECRET,
            "DTX_GATEWAY_PORT": str(port),
            "DTX_KAFKA_TOPIC_PREFIX": prefix,
            "DTX_NOTIFICATIONS_GROUP_ID": f"{prefix}notifications",
            **env,
        },
    ).build()
    try:
        stack.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield System(stack, http, prefix)
    finally:
        await stack.close_channels()
        stack.stop()
        await delete_topics(bootstrap, [prefix + t for t in TOPICS])


async def test_every_metric_used_is_exported_by_the_services(
    run_dir: Path, new_database: Callable[[str], str], infra: Any
) -> None:
    async with whole_system(run_dir, new_database, infra) as system:
        rich, poor = await system.account(1_000_000), await system.account(50)
        await system.product("TEA-1", 300, 100)
        for protocol in ("2pc", "saga"):
            ok = await system.order(rich, {"TEA-1": 2}, protocol)
            assert ok.status_code in (200, 201), ok.text
            refused = await system.order(poor, {"TEA-1": 1}, protocol)  # not enough money
            assert refused.status_code < 500, refused.text
        await system.http.get("/v1/orders/does-not-exist", headers=system.admin())
        # Let the relays publish and notifications consume (lag, inbox metrics).
        await asyncio.sleep(5)
        exported: dict[str, set[str]] = {}
        for key, proc in system.stack.procs.items():
            scraped = await system.http.get(f"{proc.http}/metrics")
            assert scraped.status_code == 200, key
            exported[key] = exported_names(scraped.text)
    union = set().union(*exported.values())
    missing = metrics_used() - union
    assert not missing, (
        f"named on a dashboard or in a rule but exported by no service: {sorted(missing)}"
    )
    # A sanity check of the scrape itself: each process exports its gRPC metrics.
    for key, names in exported.items():
        assert "dtx_grpc_server_handled_total" in names or key == "gateway", key


# -- one order, one trace -----------------------------------------------------------------------


@dataclass
class Jaeger:
    process: subprocess.Popen[bytes]
    http: str  # the query API (api_v3) and UI
    otlp_grpc: str
    health: str
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # not listening yet, or 503 while starting (HTTPError is an OSError)
            return False

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as OTLP JSON ({"resourceSpans": [...]}) from api_v3; None while Jaeger
        has none of its spans (404)."""
        request = urllib.request.Request(
            f"{self.http}/api/v3/traces/{trace_id}", headers={"Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                found: dict[str, Any] = json.load(response)["result"]
                return found
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def listen_addresses(config: Any, path: str = "") -> dict[str, str]:
    """Every address in a collector configuration a server would listen on, by its path."""
    found: dict[str, str] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if key in ("endpoint", "host") and isinstance(value, str):
                found[where] = value
            else:
                found |= listen_addresses(value, where)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found |= listen_addresses(value, f"{path}[{i}]")
    return found


def jaeger_config() -> tuple[dict[str, Any], dict[str, int]]:
    """The chart's Jaeger configuration (tracing.backend=jaeger), every listener moved onto
    a free loopback port."""
    rendered = render_observability(
        "--set",
        "tracing.backend=jaeger",
        "--set",
        "prometheus.enabled=false",
        "--set",
        "grafana.enabled=false",
    )
    assert not [o for o in rendered if "tempo" in o["metadata"]["name"]]
    config: dict[str, Any] = yaml.safe_load(
        configmap(rendered, "dtx-observability-jaeger")["jaeger.yaml"]
    )
    names = ("otlp_grpc", "otlp_http", "query_http", "query_grpc", "health", "metrics")
    ports = {name: free_port() for name in names}

    def loopback(name: str) -> str:
        return f"127.0.0.1:{ports[name]}"

    protocols = config["receivers"]["otlp"]["protocols"]
    protocols["grpc"]["endpoint"] = loopback("otlp_grpc")
    protocols["http"]["endpoint"] = loopback("otlp_http")
    extensions = config["extensions"]
    extensions["jaeger_query"]["http"]["endpoint"] = loopback("query_http")
    extensions["jaeger_query"]["grpc"]["endpoint"] = loopback("query_grpc")
    extensions["healthcheckv2"]["http"]["endpoint"] = loopback("health")
    # The collector's own metrics (Prometheus exporter), on loopback too.
    [reader] = config["service"]["telemetry"]["metrics"]["readers"]
    reader["pull"]["exporter"]["prometheus"].update(host="127.0.0.1", port=ports["metrics"])
    # Nothing left listening on another interface or on a fixed port (a listener the chart
    # adds later fails here, not as a port clash or an open port).
    addresses = listen_addresses(config)
    assert len(addresses) == len(ports), addresses
    assert all(a.startswith("127.0.0.1") for a in addresses.values()), addresses
    return config, ports


@pytest.fixture
def jaeger(tmp_path: Path) -> Iterator[Jaeger]:
    binary = toolchain.binary("jaeger")
    state = tmp_path / "jaeger"
    state.mkdir()
    config, ports = jaeger_config()
    path = state / "jaeger.yaml"
    path.write_text(yaml.safe_dump(config))
    log = state / "jaeger.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=state,
            start_new_session=True,
        )
    health = config["extensions"]["healthcheckv2"]["http"]["status"]["path"]
    server = Jaeger(
        process,
        http=f"http://127.0.0.1:{ports['query_http']}",
        otlp_grpc=f"http://127.0.0.1:{ports['otlp_grpc']}",
        health=f"http://127.0.0.1:{ports['health']}{health}",
        log=log,
    )
    try:
        deadline = time.monotonic() + 60
        while not server.healthy():
            assert process.poll() is None, (
                f"jaeger exited with {process.returncode}:\n{server.tail()}"
            )
            assert time.monotonic() < deadline, f"jaeger not healthy:\n{server.tail()}"
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)  # its data is in memory, thrown away: no clean exit needed
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def hex_id(value: str) -> str:
    """An id as hex: OTLP's JSON encoding has hex ids, protobuf's canonical JSON base64."""
    if re.fullmatch(r"[0-9a-f]{16}|[0-9a-f]{32}", value):
        return value
    return base64.b64decode(value).hex()


def _consumers_have_parents(found: dict[str, list[dict[str, Any]]]) -> bool:
    ids = {hex_id(s["spanId"]) for spans in found.values() for s in spans}
    return all(
        s.get("parentSpanId") and hex_id(s["parentSpanId"]) in ids
        for s in found.get("notifications", [])
        if s.get("kind") in ("SPAN_KIND_CONSUMER", 5)
    )


async def wait_for_trace(
    jaeger: Jaeger, trace_id: str, services: set[str], timeout: float = 90
) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    seen: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        trace = await asyncio.to_thread(jaeger.trace, trace_id)
        seen = spans_by_service(trace or {})
        # Spans reach Jaeger in each process's own export batches: wait until the
        # Kafka consumers' parents (the relays' producer spans) have come too.
        if services <= set(seen) and _consumers_have_parents(seen):
            return seen
        await asyncio.sleep(2)
    if services <= set(seen):
        return seen  # the assertions say which parent is missing
    raise AssertionError(
        f"trace {trace_id}: spans of {sorted(seen)}, missing {sorted(services - set(seen))}\n"
        f"jaeger log:\n{jaeger.tail()}"
    )


async def test_one_order_through_the_gateway_is_one_trace(
    jaeger: Jaeger, run_dir: Path, new_database: Callable[[str], str], infra: Any
) -> None:
    async with whole_system(
        run_dir, new_database, infra, OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_grpc
    ) as system:
        account = await system.account(1_000_000)
        await system.product("TEA-1", 300, 100)
        two_pc, saga = uuid.uuid4().hex, uuid.uuid4().hex
        for protocol, trace_id in (("2pc", two_pc), ("saga", saga)):
            placed = await system.order(account, {"TEA-1": 1}, protocol, trace_id)
            assert placed.status_code == 201, placed.text
            assert placed.json()["status"] == "confirmed", placed.text
        participants = {"orders", "payments", "inventory"}
        spans = await wait_for_trace(
            jaeger, two_pc, {"gateway", "coordinator", "notifications", *participants}
        )
        saga_spans = await wait_for_trace(
            jaeger, saga, {"gateway", "saga", "notifications", *participants}
        )
    for trace_id, found in ((two_pc, spans), (saga, saga_spans)):
        every = [s for service_spans in found.values() for s in service_spans]
        assert {hex_id(s["traceId"]) for s in every} == {trace_id}
        ids = {hex_id(s["spanId"]) for s in every}
        # Kafka: notifications' consumer span continues the trace (a child, not a new root).
        consumers = [
            s for s in found["notifications"] if s.get("kind") in ("SPAN_KIND_CONSUMER", 5)
        ]
        assert consumers, [s["name"] for s in found["notifications"]]
        assert all(s.get("parentSpanId") and hex_id(s["parentSpanId"]) in ids for s in consumers)
        # Each participant served a branch call (Prepare/Commit or Execute) of this order,
        # but orders prepares its own 2PC branch itself (prepared_by_caller): its SQL shows.
        for participant in participants:
            names = {s["name"] for s in found[participant]}
            if trace_id == two_pc and participant == "orders":
                assert any(n.startswith("PREPARE") for n in names), sorted(names)
                continue
            assert any("dtx.v1.Participant/" in n for n in names), (participant, sorted(names))
        print(f"trace {trace_id}:", {k: len(v) for k, v in sorted(found.items())})
