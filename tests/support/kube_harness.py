"""Helpers for tests against the loopback control plane (dtx_infra.kube): the operator as a
real process, a service-account kubeconfig and a tiny admin API client.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtx_cli.processes import free_port
from dtx_infra.kube import REPO_ROOT, ControlPlane

CRD_CHART = REPO_ROOT / "charts" / "dtx-crds"
OPERATOR_RBAC = REPO_ROOT / "k8s" / "operator" / "rbac.yaml"


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.2)


def install_crds(cp: ControlPlane) -> None:
    """Render the dtx-crds chart with the pinned helm and ``kubectl apply`` it."""
    rendered = subprocess.run(
        [str(cp.binaries.helm), "template", "dtx-crds", str(CRD_CHART)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    cp.kubectl("apply", "-f", "-", input=rendered)
    cp.kubectl(
        "wait", "--for=condition=Established", "crd/transactionpolicies.dtx.dev", "--timeout=60s"
    )


def service_account_kubeconfig(cp: ControlPlane, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig whose only credential is a token of the service account: what a pod has."""
    token = cp.kubectl("-n", namespace, "create", "token", name, "--duration=2h").stdout.strip()
    ca = base64.b64encode((cp.pki_dir / "ca.crt").read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "dtx", "cluster": {"server": cp.server, "certificate-authority-data": ca}}
        ],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "dtx", "context": {"cluster": "dtx", "user": name}}],
        "current-context": "dtx",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class AdminApi:
    """GET as cluster admin over the harness's client certificate (cheaper than kubectl)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.server = cp.server
        self._tls = ssl.create_default_context(cafile=str(cp.pki_dir / "ca.crt"))
        self._tls.load_cert_chain(cp.pki_dir / "admin.crt", cp.pki_dir / "admin.key")

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.server + path, timeout=5, context=self._tls) as resp:
                found: dict[str, Any] = json.load(resp)
                return found
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


@dataclass
class OperatorProcess:
    """``python -m dtx_operator`` as a child process, stopped (or SIGKILLed) by its PID."""

    kubeconfig: Path
    namespace: str
    log_path: Path
    liveness_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> OperatorProcess:
        """Start; with ``wait``, return once its liveness endpoint answers."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "DTX_OPERATOR_NAMESPACE": self.namespace,
            "DTX_OPERATOR_LIVENESS": f"http://127.0.0.1:{self.liveness_port}/healthz",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dtx_operator"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while wait and not self.alive():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"operator exited with {self.process.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not live within {timeout}s:\n{self.tail()}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; what a node failure or OOM kill does."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
