"""The Dockerfile and .dockerignore, read: what the image contains and how it runs.

No Docker engine is available here, so the build itself is reproduced in
tests/e2e/test_charts.py (the same `uv sync` into a fresh venv, then `dtx` and the
operator run from it); these tests pin the properties the chart relies on.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            found.append([])
        if found:
            found[-1].append(line)
    return found


def test_base_is_pinned_slim_python_and_both_stages_share_it() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(
        r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?$", text, re.M
    )
    froms = [s[0] for s in stages()]
    assert froms == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]


def test_venv_comes_from_the_lock_file_only() -> None:
    build = " ".join(stages()[0])
    assert "uv sync --frozen --no-dev --no-install-project --no-editable" in build
    assert "uv sync --frozen --no-dev --no-editable" in build
    assert re.search(r'"uv==\d+\.\d+\.\d+"', build) or re.search(r"UV_VERSION=\d+\.\d+\.\d+", build)


def test_final_stage_copies_only_venv_and_sources_and_runs_unprivileged() -> None:
    final = stages()[1]
    copies = [line for line in final if line.startswith("COPY")]
    assert [c.split()[-1] for c in copies] == ["/opt/dtx/venv", "/app/services", "/app/operator"]
    assert all("--from=build" in c for c in copies)
    assert "USER 10001:10001" in final
    assert not any(re.search(r"\b(apt-get|apt|pip) install\b", line) for line in final)
    [entrypoint] = [line for line in final if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT").strip()) == ["dtx"]
    env = " ".join(line for line in final if line.startswith("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only in the chart"


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; "!" re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, bare) for p in prefixes) or (
            bare.startswith("**/") and any(fnmatch.fnmatch(part, bare[3:]) for part in parts)
        ):
            result = not negate
    return result


def test_dockerignore_keeps_what_the_build_copies_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "services/dtx_runtime/service.py",
        "services/dtx_coordinator/migrations/0001_transaction_log.sql",
        "operator/dtx_operator/__main__.py",
    ):
        assert not ignored(needed, patterns), needed
    for local in (
        ".venv/bin/python",
        ".git/config",
        ".dtx/test/postgres",
        ".pytest_cache/v",
        "services/dtx_runtime/__pycache__/x.pyc",
        "tests/unit/test_policy.py",
        "charts/dtx/values.yaml",
        "observability/README.md",
        "Dockerfile",
    ):
        assert ignored(local, patterns), local
