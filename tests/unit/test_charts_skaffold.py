"""skaffold.yaml and k8s/kind-config.yaml name only things that exist, in the required order.

skaffold itself cannot be built here (its module is not served by the Go proxy in this
environment), so its configuration is checked by reading it: every image has a
Dockerfile, every chart path is a chart, every value it sets is a key of that chart's
values.yaml, the CRD chart is deployed before the app chart, observability is a module of
its own (no artifact, so a code change never redeploys it) with a no-observability
profile, file sync covers the Python sources the image runs from, and the ports it forwards
and kind maps are the charts' NodePorts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def configs() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all((ROOT / "skaffold.yaml").read_text()) if d]
    return {d["metadata"]["name"]: d for d in documents}


def chart_values(chart_path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / chart_path / "values.yaml").read_text())
    return loaded


def has_key(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def releases(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = config.get("deploy", {}).get("helm", {}).get("releases", [])
    return found


def test_schema_version_and_modules_in_order() -> None:
    documents = [d for d in yaml.safe_load_all((ROOT / "skaffold.yaml").read_text()) if d]
    assert all(d["apiVersion"] == "skaffold/v4beta11" and d["kind"] == "Config" for d in documents)
    assert [d["metadata"]["name"] for d in documents] == ["observability", "dtx"]


def test_crds_are_deployed_before_the_app_and_waited_for() -> None:
    dtx = releases(configs()["dtx"])
    assert [r["chartPath"] for r in dtx] == ["charts/dtx-crds", "charts/dtx"]
    assert dtx[0]["wait"] is True
    assert dtx[1]["setValues"]["defaultPolicy.assumeCRD"] is True


def test_observability_is_its_own_module_without_artifacts() -> None:
    obs = configs()["observability"]
    assert "build" not in obs, "an artifact here would redeploy observability on code changes"
    [release] = releases(obs)
    assert release["chartPath"] == "observability/chart"
    assert release["namespace"] == "observability"
    [profile] = [p for p in obs["profiles"] if p["name"] == "no-observability"]
    assert profile["deploy"] == {"kubectl": {}}, "the profile deploys nothing of this module"


def test_no_observability_profile_turns_telemetry_off() -> None:
    [profile] = [p for p in configs()["dtx"]["profiles"] if p["name"] == "no-observability"]
    assert {
        "op": "replace",
        "path": "/deploy/helm/releases/1/setValues/telemetry.enabled",
        "value": False,
    } in profile["patches"]


def test_every_chart_path_is_a_chart_and_every_value_a_key() -> None:
    for config in configs().values():
        for release in releases(config):
            chart = ROOT / release["chartPath"]
            assert (chart / "Chart.yaml").is_file(), chart
            values = chart_values(release["chartPath"])
            for key in [*release.get("setValues", {}), *release.get("setValueTemplates", {})]:
                assert has_key(values, key), f"{release['name']}: {key} is not in values.yaml"
            for file in release.get("valuesFiles", []):
                assert (ROOT / file).is_file(), file
        for profile in config.get("profiles", []):
            for patch in profile.get("patches", []):
                match = re.fullmatch(r"/deploy/helm/releases/(\d+)/setValues/(.+)", patch["path"])
                if match:
                    release = releases(config)[int(match.group(1))]
                    assert has_key(chart_values(release["chartPath"]), match.group(2)), patch


def test_the_image_is_the_dockerfile_and_sync_targets_its_source_path() -> None:
    [artifact] = configs()["dtx"]["build"]["artifacts"]
    assert artifact["image"] == "dtx"
    dockerfile = ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]
    text = dockerfile.read_text()
    assert "PYTHONPATH=/app/services:/app/operator" in text
    synced = {(rule["src"], rule["dest"]) for rule in artifact["sync"]["manual"]}
    assert synced == {("services/**/*.py", "/app"), ("operator/**/*.py", "/app")}
    templates = releases(configs()["dtx"])[1]["setValueTemplates"]
    assert templates == {
        "image.repository": "{{.IMAGE_REPO_dtx}}",
        "image.tag": "{{.IMAGE_TAG_dtx}}",
    }


def test_dev_profile_makes_sync_effective() -> None:
    [profile] = [p for p in configs()["dtx"]["profiles"] if p["name"] == "sync"]
    assert profile["activation"] == [{"command": "dev"}]
    set_values = {p["path"].rsplit("/", 1)[1]: p["value"] for p in profile["patches"]}
    assert set_values == {"security.readOnlyRootFilesystem": False, "dev.restartOnSync": True}
    hook = configs()["dtx"]["build"]["artifacts"][0]["sync"]["hooks"]["after"][0]
    assert "/tmp/dtx-child.pid" in " ".join(hook["container"]["command"])


def test_port_forwards_and_kind_mappings_match_the_charts() -> None:
    dtx, obs = configs()["dtx"], configs()["observability"]
    app = releases(dtx)[1]["setValues"]
    assert app["services.gateway.service.type"] == "NodePort"
    grafana = releases(obs)[0]["setValues"]
    assert grafana["grafana.service.type"] == "NodePort"
    kind = yaml.safe_load((ROOT / "k8s" / "kind-config.yaml").read_text())
    assert kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert kind["kind"] == "Cluster"
    mappings = {
        m["containerPort"]: m["hostPort"]
        for n in kind["nodes"]
        for m in n.get("extraPortMappings", [])
    }
    assert mappings == {
        app["services.gateway.service.nodePort"]: 8080,
        grafana["grafana.service.nodePort"]: 3000,
    }
    forwards = {f["resourceName"]: f for c in (dtx, obs) for f in c["portForward"]}
    assert (
        forwards["dtx-gateway"]["port"]
        == chart_values("charts/dtx")["services"]["gateway"]["rest"]["port"]
    )
    assert (
        forwards["dtx-observability-grafana"]["port"]
        == chart_values("observability/chart")["grafana"]["port"]
    )
