"""The committed code in services/dtx/v1 is exactly what scripts/gen-protos.sh generates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen-protos.sh"
COMMITTED = ROOT / "services"
HINT = "run scripts/gen-protos.sh"


def _files(root: Path) -> dict[str, Path]:
    """The generated API under ``root`` (``dtx/...``), by path relative to ``root``."""
    return {
        str(p.relative_to(root)): p
        for p in sorted((root / "dtx").rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _is_generated(relative: str) -> bool:
    name = Path(relative).name
    return name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))


def stale_files(generated_root: Path, committed_root: Path) -> list[str]:
    """What differs: changed or missing files, and generated files no proto produces any more."""
    generated = _files(generated_root)
    committed = _files(committed_root)
    stale = [
        f"{name} ({'missing' if name not in committed else 'differs'})"
        for name, path in generated.items()
        if name not in committed or committed[name].read_bytes() != path.read_bytes()
    ]
    stale += [
        f"{name} (no longer generated)"
        for name in committed
        if name not in generated and _is_generated(name)
    ]
    return stale


def generate(out: Path) -> None:
    # The script calls `python` and the protoc-gen-mypy plugins: those of this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{SCRIPT.name} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    generate(out)
    return out


def test_generated_code_is_fresh(generated: Path) -> None:
    protos = sorted((ROOT / "protos" / "dtx" / "v1").glob("*.proto"))
    assert protos
    produced = _files(generated)
    for proto in protos:  # the script really generated something for every proto
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert f"dtx/v1/{proto.stem}{suffix}" in produced

    stale = stale_files(generated, COMMITTED)

    assert not stale, f"stale generated code in services/dtx ({HINT}):\n  " + "\n  ".join(stale)


def test_the_comparison_notices_edits_missing_and_leftover_files(
    generated: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "services"
    shutil.copytree(generated / "dtx", copy / "dtx")
    assert stale_files(generated, copy) == []

    (copy / "dtx" / "v1" / "payments_pb2.py").write_bytes(
        (generated / "dtx" / "v1" / "payments_pb2.py").read_bytes() + b"\n"
    )
    (copy / "dtx" / "v1" / "saga_pb2_grpc.pyi").unlink()
    (copy / "dtx" / "v1" / "removed_pb2.py").write_text("# from a proto deleted since\n")
    (copy / "dtx" / "v1" / "__pycache__").mkdir()
    (copy / "dtx" / "v1" / "__pycache__" / "x.pyc").write_bytes(b"\0")

    assert stale_files(generated, copy) == [
        "dtx/v1/payments_pb2.py (differs)",
        "dtx/v1/saga_pb2_grpc.pyi (missing)",
        "dtx/v1/removed_pb2.py (no longer generated)",
    ]
