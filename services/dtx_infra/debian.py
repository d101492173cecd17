"""Debian packages the harness needs, installed once by ``make tools``.

Why from Debian: the machines reach Debian's archive but no release page or image registry,
and Debian's builds of containerd, runc, the CNI plugins and buildah are what the notes on
this machine's cluster were measured with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

from dtx_infra.errors import InfraError
from dtx_infra.procs import run

APT_TIMEOUT_S = 900.0

# The local Kubernetes node (dtx cluster) and the images built without a Docker engine.
CLUSTER_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "iproute2",
    "buildah",
    "umoci",
    "mmdebstrap",
    "busybox-static",
    # The pause image is a static C program.
    "gcc",
    "libc6-dev",
)


def missing(packages: Iterable[str]) -> list[str]:
    """The packages of ``packages`` that dpkg does not list as installed."""
    absent = []
    for name in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", name],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if status.stdout.strip() != "installed":
            absent.append(name)
    return absent


def can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(packages: Iterable[str], timeout_s: float = APT_TIMEOUT_S) -> list[str]:
    """``apt-get update && apt-get install`` what is missing, bounded; return what was."""
    wanted = missing(packages)
    if not wanted:
        return []
    if not can_install():
        why = "not running as root" if os.geteuid() != 0 else "apt-get is unavailable"
        raise InfraError(f"Debian packages missing: {' '.join(wanted)} ({why})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], what="apt-get update", timeout_s=timeout_s, env=env)
    run(
        [
            "apt-get", "install", "-y", "--no-install-recommends",
            "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
            *wanted,
        ],
        what=f"apt-get install {' '.join(wanted)}",
        timeout_s=timeout_s,
        env=env,
    )  # fmt: skip
    return wanted
