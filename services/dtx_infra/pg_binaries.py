"""Finding (and if need be installing) Debian's PostgreSQL server binaries.

Debian installs every major version side by side in ``/usr/lib/postgresql/<ver>/bin`` and
puts only client wrappers on PATH, so PATH is the wrong place to look; the newest version
directory with ``initdb``, ``pg_ctl`` and ``postgres`` wins.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.errors import InfraError
from dtx_infra.procs import run

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
APT_TIMEOUT_S = 900.0
_REQUIRED = ("initdb", "pg_ctl", "postgres")
_CREATECLUSTER_CONF = Path("/etc/postgresql-common/createcluster.conf")
NOT_FOUND = "PostgreSQL server binaries not found; install the Debian package postgresql"


@dataclass(frozen=True)
class PgBinaries:
    version: str
    bin_dir: Path

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def find_pg_binaries(root: Path = DEBIAN_PG_ROOT) -> PgBinaries | None:
    """The newest ``<root>/<ver>/bin`` holding all server tools, or None."""
    try:
        versions = [d for d in root.iterdir() if d.is_dir() and _version_key(d.name)]
    except OSError:
        return None
    for version_dir in sorted(versions, key=lambda d: _version_key(d.name), reverse=True):
        bin_dir = version_dir / "bin"
        if all(os.access(bin_dir / tool, os.X_OK) for tool in _REQUIRED):
            return PgBinaries(version_dir.name, bin_dir)
    return None


def can_apt_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install_postgres(timeout_s: float = APT_TIMEOUT_S) -> None:
    """``apt-get update && apt-get install -y postgresql``, non-interactive and bounded.

    Before the first install we tell postgresql-common not to create (and start) its default
    ``main`` cluster on port 5432: dtx runs its own cluster, and a stray server would only
    cost memory and could collide with a developer's port. An existing createcluster.conf is
    left untouched, and dpkg keeps ours instead of prompting (``--force-confold``).
    """
    if not can_apt_install():
        why = "not running as root" if os.geteuid() != 0 else "apt-get is unavailable"
        raise InfraError(f"{NOT_FOUND} ({why}, so dtx cannot install it)")
    if not _CREATECLUSTER_CONF.exists():
        _CREATECLUSTER_CONF.parent.mkdir(parents=True, exist_ok=True)
        _CREATECLUSTER_CONF.write_text(
            "# Written by dtx_infra before installing postgresql: dtx runs its own cluster.\n"
            "create_main_cluster = false\n"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], what="apt-get update", timeout_s=timeout_s, env=env)
    run(
        [
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "postgresql",
        ],
        what="apt-get install postgresql",
        timeout_s=timeout_s,
        env=env,
    )


def ensure_pg_binaries(timeout_s: float = APT_TIMEOUT_S) -> PgBinaries:
    """Find the server binaries, installing Debian's postgresql package when allowed."""
    found = find_pg_binaries()
    if found is not None:
        return found
    apt_install_postgres(timeout_s)
    found = find_pg_binaries()
    if found is None:
        raise InfraError(f"{NOT_FOUND} (apt-get install postgresql left none in {DEBIAN_PG_ROOT})")
    return found
