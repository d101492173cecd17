"""Resolving the Kafka broker's jars from Maven Central, once per version.

Why Maven rather than the Kafka tarball: the project's machines reach package registries
only, and Maven Central carries every jar of the broker. The resolved jars live outside the
repository in ``${DTX_CACHE_DIR:-~/.cache/dtx}/kafka-<version>/libs``; a stamp holding the
pom's hash makes a second run download (and start) nothing, and a changed pom re-resolve.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from dtx_infra.errors import InfraError
from dtx_infra.locking import file_lock
from dtx_infra.procs import run

KAFKA_VERSION = "3.9.1"
POM = Path(__file__).with_name("kafka") / "pom.xml"
RESOLVE_TIMEOUT_S = 900.0


def kafka_home(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    return cache_dir / f"kafka-{version}"


def libs_dir(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    return kafka_home(cache_dir, version) / "libs"


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def jars_are_cached(cache_dir: Path, pom: Path = POM) -> bool:
    """True when ``libs/`` was fully resolved from the current pom."""
    home = kafka_home(cache_dir)
    stamp = home / "libs.stamp"
    libs = home / "libs"
    try:
        return stamp.read_text().strip() == _pom_digest(pom) and any(libs.glob("kafka_2.13-*.jar"))
    except OSError:
        return False


def ensure_kafka_jars(cache_dir: Path, timeout_s: float = RESOLVE_TIMEOUT_S) -> Path:
    """Return the directory of the broker's jars, resolving them with Maven if needed.

    Resolution goes to a temporary directory that is renamed into place, so an interrupted
    download never leaves a half-filled ``libs/`` that would later look complete.
    """
    if jars_are_cached(cache_dir):
        return libs_dir(cache_dir)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            "Maven (mvn) is required to fetch the Kafka broker jars; install the Debian "
            "package maven"
        )
    home = kafka_home(cache_dir)
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / ".resolve.lock", timeout_s, "resolving Kafka jars"):
        if jars_are_cached(cache_dir):  # another process finished while we waited
            return libs_dir(cache_dir)
        pom_copy = home / "pom.xml"
        shutil.copyfile(POM, pom_copy)
        staging = home / f"libs.tmp-{os.getpid()}-{time.monotonic_ns()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom_copy),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging}",
                ],
                what=f"Maven resolving Kafka {KAFKA_VERSION} jars",
                timeout_s=timeout_s,
                cwd=home,
            )
            if not any(staging.glob("kafka_2.13-*.jar")):
                raise InfraError(f"Maven finished but {staging} holds no kafka_2.13 jar")
            final = home / "libs"
            shutil.rmtree(final, ignore_errors=True)
            staging.replace(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        (home / "libs.stamp").write_text(_pom_digest(POM) + "\n")
    return libs_dir(cache_dir)
