"""``dtx infra`` through Typer's CliRunner, without starting servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dtx_infra.cli import infra_app

pytestmark = pytest.mark.unit


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    env = {"DTX_STATE_DIR": str(tmp_path / "state"), "DTX_PG_PORT": "41432"}
    result = CliRunner().invoke(infra_app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert "postgres" in result.stdout
    assert "kafka" in result.stdout
    assert "stopped" in result.stdout
    assert "41432" in result.stdout
    assert not (tmp_path / "state").exists()  # status only reads


@pytest.mark.parametrize("command", ["status", "up", "down"])
def test_bad_pg_port_is_one_line_naming_the_variable(command: str, tmp_path: Path) -> None:
    env = {"DTX_STATE_DIR": str(tmp_path), "DTX_PG_PORT": "abc"}
    result = CliRunner().invoke(infra_app, [command], env=env)
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "DTX_PG_PORT" in lines[0]
    assert "'abc'" in lines[0]
    assert "Traceback" not in result.output


def test_down_without_state_is_a_noop(tmp_path: Path) -> None:
    env = {"DTX_STATE_DIR": str(tmp_path / "never-used")}
    result = CliRunner().invoke(infra_app, ["down"], env=env)
    assert result.exit_code == 0, result.output
