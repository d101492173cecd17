"""Locating a Java runtime and checking that it is at least Java 17.

Kafka 3.9 still runs on 11, but the project standardises on 17 (the Maven toolchain and the
operator tests use it), so one requirement keeps the error messages consistent.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dtx_infra.errors import InfraError
from dtx_infra.procs import run

MIN_JAVA = 17
_VERSION_RE = re.compile(r'version "(?P<major>\d+)(?:\.(?P<minor>\d+))?[^"]*"')


def parse_java_major(version_output: str) -> int | None:
    """The major version from ``java -version`` output.

    Handles both the legacy scheme (``"1.8.0_392"`` -> 8) and the modern one
    (``"17.0.15"``, ``"21"``, ``"22-ea"``); None when the text has no version string.
    """
    match = _VERSION_RE.search(version_output)
    if match is None:
        return None
    major = int(match.group("major"))
    if major == 1 and match.group("minor") is not None:
        return int(match.group("minor"))
    return major


def find_java() -> Path | None:
    """``$JAVA_HOME/bin/java`` when set and present, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("java")
    return Path(found) if found else None


def require_java(minimum: int = MIN_JAVA) -> Path:
    """Return the java binary, or raise an InfraError that names Java ``minimum``."""
    java = find_java()
    if java is None:
        raise InfraError(
            f"Java {minimum} or newer is required to run Kafka but no java was found; "
            f"install the Debian package openjdk-{minimum}-jre-headless"
        )
    out = run([str(java), "-version"], what="java -version", timeout_s=30).output
    major = parse_java_major(out)
    if major is None or major < minimum:
        shown = major if major is not None else "an unknown version"
        raise InfraError(
            f"Java {minimum} or newer is required to run Kafka; {java} is Java {shown}"
        )
    return java
