"""dtx_infra.images, the pure parts: content keys, references, the missing-image error.

The builds themselves need root, buildah and mmdebstrap (`make images`); the archives they
write are imported and run by tests/e2e/test_images.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dtx_infra import images
from dtx_infra.errors import InfraError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def make_tree(root: Path) -> Path:
    (root / "services" / "pkg").mkdir(parents=True)
    (root / "services" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "services" / "run.sh").write_text("#!/bin/sh\n")
    (root / "operator").mkdir()
    (root / "operator" / "op.py").write_text("y = 2\n")
    (root / "Dockerfile").write_text("FROM x\n")
    return root


def key(root: Path) -> str:
    return images.digest(images.tree_parts(root, ["Dockerfile", "services", "operator"]))


def test_tree_key_is_stable_and_ignores_caches_and_bytecode(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    before = key(root)
    assert key(root) == before
    # What running the tests or the linters leaves behind is not part of the context.
    (root / "services" / "pkg" / "__pycache__").mkdir()
    (root / "services" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / "services" / "pkg" / "stale.pyc").write_bytes(b"\0")
    (root / "services" / ".mypy_cache").mkdir()
    (root / "services" / ".mypy_cache" / "x.json").write_text("{}")
    (root / "services" / "dtx.egg-info").mkdir()
    (root / "services" / "dtx.egg-info" / "PKG-INFO").write_text("x")
    assert key(root) == before


@pytest.mark.parametrize(
    "change",
    [
        lambda r: (r / "services" / "pkg" / "mod.py").write_text("x = 2\n"),
        lambda r: (r / "services" / "pkg" / "new.py").write_text(""),
        lambda r: (r / "operator" / "op.py").unlink(),
        lambda r: (r / "operator" / "op.py").rename(r / "operator" / "op2.py"),
        lambda r: (r / "services" / "run.sh").chmod(0o755),
        lambda r: (r / "Dockerfile").write_text("FROM y\n"),
    ],
    ids=["edit", "add", "remove", "rename", "chmod +x", "dockerfile"],
)
def test_tree_key_changes_with_any_input(tmp_path: Path, change: object) -> None:
    root = make_tree(tmp_path)
    before = key(root)
    assert callable(change)
    change(root)
    assert key(root) != before


def test_digest_is_not_fooled_by_moving_bytes_between_parts() -> None:
    assert images.digest([("a", b"bc")]) != images.digest([("ab", b"c")])
    assert images.digest([("a", b""), ("b", b"")]) != images.digest([("b", b""), ("a", b"")])
    assert re.fullmatch(r"[0-9a-f]{12}", images.digest([]))


def test_dtx_key_covers_the_dockerignore_excludes() -> None:
    """Every ``**/`` pattern of .dockerignore is left out of the dtx key too, so a file the
    build never sees cannot force a rebuild (and the two lists do not drift apart)."""
    patterns = [
        line.strip().removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("**/")
    ]
    assert patterns
    for pattern in patterns:
        covered = pattern in images.IGNORED_DIRS or any(
            re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), pattern.replace("[cod]", "c"))
            for p in (*images.IGNORED_FILES, "*.egg-info")
        )
        assert covered, f".dockerignore's **/{pattern} is not left out of the dtx key"
    assert set(images.DTX_INPUTS + images.DTX_TREES) >= {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "services",
        "operator",
        "Dockerfile",
    }


def test_apt_policy_parsing() -> None:
    text = (
        "python3.11:\n  Installed: (none)\n  Candidate: 3.11.2-6+deb12u6\n  Version table:\n"
        "     3.11.2-6+deb12u6 500\n"
        "postgresql-15:\n  Installed: 15.14-0+deb12u1\n  Candidate: 15.14-0+deb12u1\n"
        "missing:\n  Installed: (none)\n  Candidate: (none)\n"
    )
    assert images.parse_apt_policy(text) == {
        "python3.11": "3.11.2-6+deb12u6",
        "postgresql-15": "15.14-0+deb12u1",
        "missing": "(none)",
    }


def test_refs_name_the_local_registry_version_and_key() -> None:
    assert images.make_ref("postgresql", "15", "0123456789ab") == (
        "dtx.local/postgresql:15-0123456789ab"
    )
    assert images.make_ref("dtx", "", "0123456789ab") == "dtx.local/dtx:0123456789ab"
    tag_rule = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # the chart's image.tag pattern
    assert re.fullmatch(tag_rule, images.make_ref("kafka", "3.9.1", "ab" * 6).split(":")[1])


def test_every_cluster_image_has_a_recipe_and_python_is_dtx_base_only() -> None:
    assert set(images.CLUSTER_IMAGES) == set(images.NAMES) - {"python"}
    assert {"pause", "dtx", "postgresql", "kafka", "coredns", "prometheus", "jaeger"} <= set(
        images.CLUSTER_IMAGES
    )
    assert images.recipe("dtx").needs == ("python",)
    assert images._with_needs(["dtx"]) == ["python", "dtx"]
    with pytest.raises(InfraError, match="no image 'nginx'"):
        images.recipe("nginx")


def test_archive_of_an_unbuilt_image_names_make_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(images, "ref", lambda name: f"dtx.local/{name}:0123456789ab")
    with pytest.raises(images.ImageMissing, match=r"run `make images`") as err:
        images.archive("pause")
    assert isinstance(err.value, InfraError)
    assert "dtx.local/pause:0123456789ab" in err.value.summary
    # Built: the archive is found, nothing is built.
    path = tmp_path / "images" / "pause-0123456789ab.oci.tar"
    path.parent.mkdir()
    path.write_bytes(b"")
    assert images.archive("pause") == ("dtx.local/pause:0123456789ab", path)


def test_stale_archives_are_older_builds_of_that_image_only(tmp_path: Path) -> None:
    names = [
        "dtx-0123456789ab.oci.tar",
        "dtx-aaaaaaaaaaaa.oci.tar",
        "python-3.11-bbbbbbbbbbbb.oci.tar",
        "kafka-3.9.1-cccccccccccc.oci.tar",
        "dtx-notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    current = tmp_path / "dtx-0123456789ab.oci.tar"
    assert images.stale_archives(tmp_path, "dtx", current) == [
        tmp_path / "dtx-aaaaaaaaaaaa.oci.tar"
    ]
    assert images.stale_archives(tmp_path, "python", tmp_path / "x") == [
        tmp_path / "python-3.11-bbbbbbbbbbbb.oci.tar"
    ]


def test_minimal_root_names_the_users_and_a_sticky_tmp(tmp_path: Path) -> None:
    images.write_minimal_root(tmp_path, [("jaeger", 10001)])
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    assert [line.split(":")[:3] for line in passwd] == [
        ["root", "x", "0"],
        ["jaeger", "x", "10001"],
        ["nobody", "x", "65534"],
    ]
    assert "jaeger:x:10001:" in (tmp_path / "etc" / "group").read_text()
    assert (tmp_path / "tmp").stat().st_mode & 0o7777 == 0o1777


def test_go_images_run_as_the_charts_users() -> None:
    assert images.GO_IMAGES["prometheus"].uid == 65534  # observability/chart prometheus.uid
    assert images.GO_IMAGES["jaeger"].uid == 10001  # observability/chart jaeger.uid
    config = images.GO_IMAGES["coredns"].config()
    assert config.entrypoint == ("/usr/bin/coredns",)
    assert config.user == "65532:65532"


def test_mmdebstrap_command_uses_host_sources_and_slim_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
    monkeypatch.setenv("DTX_IMAGES_APT_SOURCES", str(sources))
    cmd = images.mmdebstrap_cmd(tmp_path / "root", "essential", ["postgresql-15"])
    assert cmd[-3:] == ["bookworm", str(tmp_path / "root"), str(sources)]
    assert "--include=postgresql-15" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in cmd
    assert any(arg.startswith("--hook-dir=") and "merged-usr" in arg for arg in cmd)


def test_slim_removes_device_nodes_logs_and_apt_lists(tmp_path: Path) -> None:
    for rel in ("dev/null", "var/log/dpkg.log", "var/lib/apt/lists/deb_debian_Packages"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "python3").write_text("x")
    images.slim(tmp_path)
    assert not any((tmp_path / "dev").iterdir())
    assert not (tmp_path / "var" / "log" / "dpkg.log").exists()
    assert not any((tmp_path / "var" / "lib" / "apt" / "lists").iterdir())
    assert (tmp_path / "usr" / "bin" / "python3").exists()
