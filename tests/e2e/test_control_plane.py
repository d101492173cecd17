"""End-to-end checks of the loopback Kubernetes control plane (dtx_infra.kube).

They prove the properties the operator and helm tests rely on: the pinned release is what
runs, the garbage collector honours ownerReferences, RBAC is enforced for service accounts,
service-account tokens are really signed and accepted, and stop() leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtx_infra.kube import REPO_ROOT, ControlPlane

# The module fixture may have to build the binaries first (tens of minutes on a cold
# cache); every wait inside the tests is bounded on its own.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * 3600)]


def _pinned_release() -> str:
    go_mod = (REPO_ROOT / "toolchain" / "kubernetes" / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", go_mod, re.MULTILINE)
    assert match, "k8s.io/kubernetes is not pinned in toolchain/kubernetes/go.mod"
    return match.group(1)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("kube")) as plane:
        yield plane


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.5)


def test_server_runs_pinned_release(cp: ControlPlane) -> None:
    versions = json.loads(cp.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == _pinned_release()
    assert versions["clientVersion"]["gitVersion"] == _pinned_release()


def test_garbage_collector_deletes_dependents(cp: ControlPlane) -> None:
    ns = "gc-test"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("-n", ns, "create", "configmap", "owner", "--from-literal=k=v")
    uid = cp.kubectl("-n", ns, "get", "configmap", "owner", "-o", "jsonpath={.metadata.uid}")
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": ns,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid.stdout}
            ],
        },
    }
    cp.kubectl("create", "-f", "-", input=json.dumps(dependent))
    assert cp.kubectl("-n", ns, "get", "configmap", "dependent", "-o", "name").stdout.strip()

    cp.kubectl("-n", ns, "delete", "configmap", "owner")

    def dependent_gone() -> bool:
        out = cp.kubectl(
            "-n", ns, "get", "configmap", "dependent", "--ignore-not-found", "-o", "name"
        ).stdout
        return out.strip() == ""

    _eventually(dependent_gone, "garbage collector deletes configmap/dependent")


def test_role_grants_exactly_its_verbs(cp: ControlPlane) -> None:
    ns, granted = "rbac-test", {"get", "list", "watch"}
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("-n", ns, "create", "serviceaccount", "bot")
    cp.kubectl(
        "-n",
        ns,
        "create",
        "role",
        "cm-reader",
        f"--verb={','.join(sorted(granted))}",
        "--resource=configmaps",
    )
    cp.kubectl(
        "-n",
        ns,
        "create",
        "rolebinding",
        "bot-cm-reader",
        "--role=cm-reader",
        f"--serviceaccount={ns}:bot",
    )

    def can(verb: str, resource: str, namespace: str = ns) -> bool:
        result = cp.kubectl(
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            namespace,
            f"--as=system:serviceaccount:{ns}:bot",
            check=False,
        )
        assert result.stdout.strip() in {"yes", "no"}, result.stderr
        return result.stdout.strip() == "yes"

    for verb in ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"):
        assert can(verb, "configmaps") == (verb in granted), verb
    assert not can("get", "secrets")
    assert not can("get", "configmaps", namespace="default")


def test_service_account_tokens_are_signed_and_accepted(cp: ControlPlane) -> None:
    ns = "token-test"
    cp.kubectl("create", "namespace", ns)
    # The controller-manager's serviceaccount controller populates every namespace.
    _eventually(
        lambda: (
            cp.kubectl("-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0
        ),
        "serviceaccount/default is created by kube-controller-manager",
    )
    token = cp.kubectl("-n", ns, "create", "token", "default").stdout.strip()
    # kubectl without the admin kubeconfig: the bearer token is the only credential.
    whoami = subprocess.run(
        [
            str(cp.binaries.kubectl),
            "--kubeconfig=/dev/null",
            f"--server={cp.server}",
            f"--certificate-authority={cp.pki_dir / 'ca.crt'}",
            f"--token={token}",
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert whoami.stdout == f"system:serviceaccount:{ns}:default", whoami.stderr


def test_stop_leaves_no_process(cp: ControlPlane) -> None:
    pids = cp.pids
    assert len(pids) == 3
    cp.stop()
    assert cp.pids == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    state = str(cp.state_dir)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert state not in cmdline.read_bytes().decode(errors="replace"), cmdline
        except OSError:
            continue  # the process exited while we looked
