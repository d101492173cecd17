"""dtx services as child processes on loopback: started with ``python -m dtx_cli.serve``, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dtx_infra.ports import free_ports


def free_port() -> int:
    """A loopback port that is free now, outside the ephemeral range."""
    return free_ports(1)[0]


@dataclass
class ServiceProcess:
    """One dtx service as a child process on loopback ports of its own."""

    name: str
    env: dict[str, str]
    log_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    argv: list[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> ServiceProcess:
        env = {
            **os.environ,
            "DTX_SERVICE_NAME": self.name,
            "DTX_BIND_HOST": "127.0.0.1",
            "DTX_GRPC_PORT": str(self.grpc_port),
            "DTX_HTTP_PORT": str(self.http_port),
            "DTX_SHUTDOWN_GRACE_SECONDS": "5",
            **self.env,
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv or [sys.executable, "-m", "dtx_cli.serve", self.name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for a graceful exit; SIGKILL only if it did not come in time."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def kill(self) -> None:
        """SIGKILL: the crash the recovery tests are about."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, *, wait: bool = True) -> ServiceProcess:
        self.kill()
        return self.start(wait=wait)
