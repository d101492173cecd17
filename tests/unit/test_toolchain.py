"""The toolchain: built once before the tests, only *found* by them.

A build under a test's timeout failed a newcomer's first ``make test`` (issue 14); these
tests hold the harness to finding tools, and the builder to its lock, its progress lines
and its cache keys. The builder runs against a stand-in ``go`` here (a shell script that
writes the binaries it is asked for); the real compiler runs in ``make tools``.
"""

from __future__ import annotations

import ast
import itertools
import os
import stat
import threading
from pathlib import Path

import pytest

from dtx_infra import InfraError, toolchain
from dtx_infra.kube import REPO_ROOT

pytestmark = pytest.mark.unit

# The only modules allowed to start a build: the builder, the command behind `make tools`,
# and this file (whose builds use a stand-in compiler in a temporary cache).
BUILDERS = {
    REPO_ROOT / "services" / "dtx_infra" / "toolchain.py",
    REPO_ROOT / "services" / "dtx_infra" / "cli.py",
    Path(__file__).resolve(),
}
BUILD_NAMES = {"build", "build_group", "toolchain_build"}


def _python_files() -> list[Path]:
    roots = [REPO_ROOT / "tests", REPO_ROOT / "services", REPO_ROOT / "operator"]
    return [p for root in roots for p in root.rglob("*.py") if p not in BUILDERS]


def _build_calls(tree: ast.AST) -> list[str]:
    """Calls that would build: toolchain.build*(), a build function imported from the
    toolchain, or a command line that starts with go build/install/run."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "dtx_infra.toolchain"
        for alias in node.names
        if alias.name in BUILD_NAMES
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in BUILD_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id == "toolchain"
        ):
            found.append(f"toolchain.{node.attr} (line {node.lineno})")
        if isinstance(node, ast.Name) and node.id in imported:
            found.append(f"{node.id} (line {node.lineno})")
        if isinstance(node, ast.List | ast.Tuple):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            for first, second in itertools.pairwise(words):
                if str(first).rsplit("/", 1)[-1] == "go" and second in ("build", "install"):
                    found.append(f"go {second} (line {node.lineno})")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "toolchain build" in node.value
            and "make tools" not in node.value
        ):
            found.append(f"{node.value!r} (line {node.lineno})")
    return found


def test_no_test_or_fixture_builds_a_tool() -> None:
    offenders = {
        str(path.relative_to(REPO_ROOT)): calls
        for path in _python_files()
        if (calls := _build_calls(ast.parse(path.read_text(), str(path))))
    }
    assert offenders == {}, "only `make tools` builds; tests use toolchain.binary()"


def test_the_check_catches_a_build_in_a_fixture() -> None:
    """The scan above would see each way of building that a test might write."""
    source = (
        "from dtx_infra import toolchain\n"
        "from dtx_infra.toolchain import build_group as bg\n"
        "def f():\n"
        "    toolchain.build(['helm'])\n"
        "    bg(None)\n"
        "    subprocess.run(['/usr/bin/go', 'build', './cmd/x'])\n"
    )
    assert len(_build_calls(ast.parse(source))) == 3


def test_a_missing_tool_fails_at_once_naming_make_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DTX_CACHE_DIR", str(tmp_path))
    with pytest.raises(toolchain.ToolMissing, match=r"make tools") as caught:
        toolchain.binary("kubelet")
    assert "kubernetes" in str(caught.value)
    with pytest.raises(InfraError, match="no tool named"):
        toolchain.binary("tempo")  # AGPL: not in the toolchain at all


def test_every_group_pins_its_version_and_no_agpl_tool() -> None:
    names = [b for g in toolchain.GROUPS for b in g.binaries]
    assert len(names) == len(set(names)), "a binary is built by one group only"
    for g in toolchain.GROUPS:
        assert g.version().startswith("v"), g.name
        assert (g.module_dir / "go.sum").is_file(), g.name
        text = (g.module_dir / "go.mod").read_text()
        assert "github.com/grafana/tempo " not in text
        assert "grafana/grafana " not in text
    assert toolchain.group("helm").version().startswith("v4.")


# -- the builder, with a stand-in compiler ---------------------------------------------------

FAKE_GO = """#!/bin/sh
# Stand-in for `go build ... -o DIR/ pkg...`: one file per package, after a pause.
echo run >> "{counter}"
sleep {delay}
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
for a in "$@"; do case "$a" in example.com/*) n="${{a##*/}}"; printf '#!/bin/sh\\n' > "$out$n";
  chmod +x "$out$n";; esac; done
[ -n "{fail}" ] && {{ echo "compile error: {fail}"; exit 1; }}
exit 0
"""


def _fake_group(tmp_path: Path, *, delay: float = 0.0, fail: str = "") -> toolchain.ToolGroup:
    module = tmp_path / "modules" / "demo"
    module.mkdir(parents=True)
    (module / "go.mod").write_text("module x\n\nrequire example.com/demo v1.2.3\n")
    (module / "go.sum").write_text("example.com/demo v1.2.3 h1:abc=\n")
    go = tmp_path / "go"
    counter = tmp_path / "runs"
    go.write_text(FAKE_GO.format(counter=counter, delay=delay, fail=fail))
    go.chmod(go.stat().st_mode | stat.S_IXUSR)
    os.environ["GO"] = str(go)
    return toolchain.ToolGroup(
        "demo",
        "example.com/demo",
        {"alpha": "example.com/alpha", "beta": "example.com/beta"},
        root=tmp_path / "modules",
    )


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DTX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GO", "")
    return tmp_path


def test_parallel_callers_wait_for_one_build(
    isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = _fake_group(isolated, delay=0.5)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(toolchain.build_group(g))) for _ in "ab"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (isolated / "runs").read_text().count("run") == 1
    assert results[0] == results[1] == g.bin_dir()
    assert g.is_built()
    assert os.access(g.bin_dir() / "beta", os.X_OK)
    err = capsys.readouterr().err
    assert "toolchain: building demo v1.2.3 (alpha, beta)" in err
    assert "toolchain: built demo v1.2.3 in" in err
    assert "built by another process" in err
    toolchain.build_group(g)  # a third call only finds it
    assert "demo v1.2.3 cached" in capsys.readouterr().err


def test_a_long_build_shows_it_is_alive(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(toolchain, "HEARTBEAT_S", 0.2)
    toolchain.build_group(_fake_group(isolated, delay=1.0))
    assert "toolchain: still building demo" in capsys.readouterr().err


def test_a_failed_build_names_the_group_and_leaves_nothing_that_looks_built(
    isolated: Path,
) -> None:
    g = _fake_group(isolated, fail="undefined: x")
    with pytest.raises(InfraError, match=r"building demo v1\.2\.3 failed") as caught:
        toolchain.build_group(g)
    assert "compile error: undefined: x" in str(caught.value)
    assert not g.is_built()
    assert not g.bin_dir().exists()


def test_a_changed_pin_builds_into_a_new_directory(isolated: Path) -> None:
    g = _fake_group(isolated)
    first = toolchain.build_group(g)
    (g.module_dir / "go.sum").write_text("example.com/demo v1.2.3 h1:changed=\n")
    assert not g.is_built()
    assert g.bin_dir() != first
    assert toolchain.build_group(g) == g.bin_dir()
    assert (isolated / "runs").read_text().count("run") == 2
