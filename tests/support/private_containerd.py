"""A containerd of a test's own: its root, state and socket in a temporary directory.

Why not the cluster's: a test that imports and runs images must not depend on (or leave
anything in) a containerd another test or a developer's `dtx cluster up` uses. The
configuration carries what this kind of machine needs (see shared notes on the single-node
cluster): cgroupfs rather than systemd, overlayfs, and ``restrict_oom_score_adj`` because
root here lacks CAP_SYS_RESOURCE. containerd is stopped by its PID and the directory
removed, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CRI = 'plugins."io.containerd.grpc.v1.cri"'


def config_toml(base: Path, sandbox_image: str) -> str:
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{base / "containerd.sock"}"
[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"
[{CRI}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  [{CRI}.containerd]
    snapshotter = "overlayfs"
    [{CRI}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{CRI}.containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


@dataclass(frozen=True)
class PrivateContainerd:
    base: Path
    pid: int
    ctr_binary: str

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    def ctr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``ctr`` on namespace k8s.io of this containerd (output captured, not checked)."""
        cmd: Sequence[str] = [self.ctr_binary, "--address", self.address, "-n", "k8s.io", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


@contextmanager
def private_containerd(
    sandbox_image: str = "dtx.local/pause:none", timeout_s: float = 30
) -> Iterator[PrivateContainerd]:
    containerd, ctr = shutil.which("containerd"), shutil.which("ctr")
    if containerd is None or ctr is None:
        raise RuntimeError("containerd and ctr are required (Debian package containerd)")
    # /tmp, short: a unix socket path must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="dtx-ctd-"))
    (base / "config.toml").write_text(config_toml(base, sandbox_image))
    log = (base / "containerd.log").open("wb")
    proc = subprocess.Popen(
        [containerd, "--config", str(base / "config.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ready = PrivateContainerd(base, proc.pid, ctr)
        _wait_answering(ready, proc, timeout_s)
        try:
            yield ready
        finally:
            _remove_tasks(ready)
    finally:
        _stop(proc)
        log.close()
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


def _wait_answering(c: PrivateContainerd, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"containerd exited ({proc.returncode}): "
                f"{(c.base / 'containerd.log').read_text()[-2000:]}"
            )
        if Path(c.address).exists() and c.ctr("version", timeout_s=10).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"containerd did not answer on {c.address} within {timeout_s:.0f}s")


def _remove_tasks(c: PrivateContainerd) -> None:
    """Tasks and containers a failed test left: their shims would outlive containerd."""
    for task in c.ctr("tasks", "list", "--quiet").stdout.split():
        c.ctr("tasks", "kill", "--signal", "SIGKILL", task)
        c.ctr("tasks", "delete", "--force", task)
    for container in c.ctr("containers", "list", "--quiet").stdout.split():
        c.ctr("containers", "delete", container)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _unmount_below(base: Path) -> None:
    """Snapshot mounts a killed task may have left (innermost first), so rmtree can work."""
    prefix = str(base) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
