"""Running PostgreSQL's tools as the ``postgres`` system user when we are root.

PostgreSQL refuses to run as root. On the project's machines everything runs as root, so
initdb, pg_ctl and the server itself run as the ``postgres`` user that Debian's package
creates, and the cluster's directory is handed to that user. That user must also be able to
reach the directory: every ancestor needs the search (x) bit for it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.errors import InfraError

SYSTEM_USER = "postgres"


@dataclass(frozen=True)
class RunAs:
    """How to run PostgreSQL tools: a command prefix and the uid/gid that will own files."""

    prefix: tuple[str, ...]
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def switches_user(self) -> bool:
        return bool(self.prefix)


def current_runas() -> RunAs:
    """Run as ourselves unless root, in which case drop to the ``postgres`` system user."""
    if os.geteuid() != 0:
        return RunAs((), os.geteuid(), os.getegid(), frozenset(os.getgroups()))
    try:
        pw = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise InfraError(
            "running as root, but the system user 'postgres' that PostgreSQL must run as "
            "does not exist; install the Debian package postgresql"
        ) from None
    groups = frozenset(os.getgrouplist(SYSTEM_USER, pw.pw_gid))
    if shutil.which("runuser"):
        prefix: tuple[str, ...] = ("runuser", "-u", SYSTEM_USER, "--")
    elif shutil.which("setpriv"):
        prefix = ("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--")
    else:
        raise InfraError(
            "running as root, but neither runuser nor setpriv is available to start "
            "PostgreSQL as the postgres user; install the Debian package util-linux"
        )
    return RunAs(prefix, pw.pw_uid, pw.pw_gid, groups)


def _searchable_by(path: Path, runas: RunAs) -> bool:
    st = path.stat()
    if st.st_uid == runas.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in runas.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_reachable(directory: Path, runas: RunAs) -> None:
    """Raise unless the run-as user can traverse every ancestor of ``directory``."""
    if not runas.switches_user:
        return
    for ancestor in reversed(directory.absolute().parents):
        if not _searchable_by(ancestor, runas):
            raise InfraError(
                f"the postgres system user cannot enter {ancestor} (it needs the x bit for "
                f"others); choose a state dir it can reach with DTX_STATE_DIR, or "
                f"`chmod o+x {ancestor}`"
            )


def chown_tree(root: Path, runas: RunAs) -> None:
    """Give ``root`` and everything below it to the run-as user (a no-op when not root)."""
    if not runas.switches_user:
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in filenames)):
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (runas.uid, runas.gid):
                os.lchown(name, runas.uid, runas.gid)
