"""Migration discovery on disk and the advisory lock key, without a database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtx_runtime import MigrationError
from dtx_runtime.migrations import Migration, advisory_lock_key, discover

pytestmark = pytest.mark.unit


def _write(directory: Path, name: str, sql: str = "SELECT 1;") -> Path:
    path = directory / name
    path.write_text(sql)
    return path


def test_discover_orders_by_version_not_by_creation(tmp_path: Path) -> None:
    # Created newest first, with modification times in the same (wrong) order.
    for i, name in enumerate(["0010_tenth.sql", "0002_second.sql", "0001_first.sql"]):
        path = _write(tmp_path, name, f"-- {name}\nSELECT {i};")
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))

    found = discover(tmp_path)

    assert [m.version for m in found] == [1, 2, 10]
    assert [m.name for m in found] == ["first", "second", "tenth"]
    assert found[0].sql == "-- 0001_first.sql\nSELECT 2;"


def test_discover_ignores_files_that_are_not_sql(tmp_path: Path) -> None:
    _write(tmp_path, "0001_init.sql")
    _write(tmp_path, "README.md", "# notes")
    _write(tmp_path, "0002_later.sql.orig", "junk")
    (tmp_path / "drafts").mkdir()

    assert [m.version for m in discover(tmp_path)] == [1]


def test_discover_of_an_empty_directory_is_empty(tmp_path: Path) -> None:
    assert discover(tmp_path) == []


@pytest.mark.parametrize(
    "bad_name",
    ["1_init.sql", "00001_init.sql", "0001-init.sql", "0001_Init.sql", "init.sql", "0001_.sql"],
)
def test_a_badly_named_file_is_an_error_naming_it(tmp_path: Path, bad_name: str) -> None:
    _write(tmp_path, "0001_good.sql")
    _write(tmp_path, bad_name)

    with pytest.raises(MigrationError) as caught:
        discover(tmp_path)

    assert bad_name in str(caught.value)


def test_duplicate_versions_are_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "0001_accounts.sql")
    _write(tmp_path, "0001_ledger.sql")

    with pytest.raises(MigrationError, match="0001"):
        discover(tmp_path)


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_checksum_follows_the_sql() -> None:
    a = Migration(1, "init", "CREATE TABLE t (id int);")
    assert a.checksum == Migration(1, "init", "CREATE TABLE t (id int);").checksum
    assert a.checksum != Migration(1, "init", "CREATE TABLE t (id bigint);").checksum
    assert len(a.checksum) == 64


def test_the_runtime_and_services_ship_well_formed_migrations() -> None:
    root = Path(__file__).resolve().parents[2] / "services"
    directories = sorted({p.parent for p in root.glob("*/**/migrations/*.sql")})
    assert directories, "no migrations found under services/"
    for directory in directories:
        assert discover(directory), directory  # names parse, versions unique


def test_advisory_lock_key_is_stable_and_per_scope() -> None:
    key = advisory_lock_key("payments")
    assert key == advisory_lock_key("payments")
    assert -(2**63) <= key < 2**63
    scopes = ["payments", "inventory", "orders", "coordinator", "saga", "Payments", ""]
    assert len({advisory_lock_key(s) for s in scopes}) == len(scopes)


def test_advisory_lock_key_is_the_same_in_another_process() -> None:
    """Replicas are separate processes: the key must not depend on hash randomisation."""
    code = (
        "from dtx_runtime.migrations import advisory_lock_key; print(advisory_lock_key('payments'))"
    )
    keys = set()
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        keys.add(int(out.stdout))
    assert keys == {advisory_lock_key("payments")}
