"""The Go-built tools of the test harness and the local cluster, built once, before any test.

Why a step of its own: a cold build of the Kubernetes binaries takes tens of CPU-minutes on
2 cores, and a build under a test's timeout fails the test for a reason that has nothing to
do with the code under test. ``dtx toolchain build`` (``make tools``) builds every tool here
into ``${DTX_CACHE_DIR:-~/.cache/dtx}/toolchain``; tests and fixtures only call
:func:`binary`, which never builds: a missing tool fails at once, naming ``make tools``.

Each *group* is one consumer Go module under ``toolchain/<group>/`` (the single source of
truth for versions: its go.mod and go.sum pin every dependency) built by ONE ``go build``
invocation, so binaries that share packages (the six Kubernetes commands) compile them once.
A group's cache directory is named by its version and a digest of its go.mod, go.sum and
recipe, so a changed pin builds into a new directory and finding a tool needs no build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dtx_infra.errors import InfraError
from dtx_infra.locking import file_lock
from dtx_infra.procs import tail_file

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLCHAIN_DIR = REPO_ROOT / "toolchain"
BUILD_TIMEOUT_S = 3 * 3600.0  # a whole cold group on a loaded 2-core machine, with room
HEARTBEAT_S = 60.0


class ToolMissing(InfraError):
    """A tool the harness needs was not built; the message says to run ``make tools``."""


def cache_root() -> Path:
    return Path(os.environ.get("DTX_CACHE_DIR") or Path.home() / ".cache" / "dtx") / "toolchain"


def _version_x(package: str, values: dict[str, str]) -> str:
    return " ".join(f"-X {package}.{key}={value}" for key, value in values.items())


def _kubernetes_ldflags(version: str) -> str:
    minor = version.removeprefix("v1.").split(".")[0]
    fields = {"gitVersion": version, "gitMajor": "1", "gitMinor": minor, "gitTreeState": "clean"}
    return " ".join(
        _version_x(p, fields)
        for p in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    )


def _helm_ldflags(version: str) -> str:
    return _version_x(
        "helm.sh/helm/v4/internal/version", {"version": version, "gitTreeState": "clean"}
    )


def _prometheus_ldflags(version: str) -> str:
    # The module's v0.3XY.Z is Prometheus 3.XY.Z.
    minor = int(version.removeprefix("v0.3").split(".")[0])
    release = f"3.{minor}.{version.rsplit('.', 1)[1]}"
    return _version_x(
        "github.com/prometheus/common/version",
        {"Version": release, "Branch": "HEAD", "Revision": version, "BuildUser": "dtx"},
    )


def _no_ldflags(version: str) -> str:
    return ""


@dataclass(frozen=True)
class ToolGroup:
    """One consumer module and the binaries one ``go build`` makes from it."""

    name: str
    version_of: str  # the module whose pinned version names the cache directory
    binaries: dict[str, str]  # binary name -> Go package
    ldflags: Callable[[str], str] = _no_ldflags
    tags: tuple[str, ...] = ()
    used_by: str = ""
    env: dict[str, str] = field(default_factory=dict)
    root: Path = TOOLCHAIN_DIR  # where the consumer modules live (tests point elsewhere)

    @property
    def module_dir(self) -> Path:
        return self.root / self.name

    def version(self) -> str:
        for line in (self.module_dir / "go.mod").read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["require"]:
                parts = parts[1:]
            if parts[:1] == [self.version_of] and len(parts) > 1 and parts[1].startswith("v"):
                return parts[1]
        raise InfraError(f"toolchain/{self.name}/go.mod pins no version of {self.version_of}")

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            h.update((self.module_dir / name).read_bytes())
        recipe = [sorted(self.binaries.items()), self.tags, self.ldflags(self.version())]
        h.update(json.dumps(recipe).encode())
        return h.hexdigest()[:12]

    def bin_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.version()}-{self.digest()}" / "bin"

    def is_built(self) -> bool:
        d = self.bin_dir()
        return (d / ".complete").is_file() and all(os.access(d / b, os.X_OK) for b in self.binaries)


GROUPS: tuple[ToolGroup, ...] = (
    ToolGroup(
        "kubernetes",
        "k8s.io/kubernetes",
        {
            name: f"k8s.io/kubernetes/cmd/{name}"
            for name in (
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
                "kube-proxy",
                "kubectl",
            )
        },
        _kubernetes_ldflags,
        used_by="the control plane of the operator and chart tests, and `dtx cluster up`",
    ),
    ToolGroup(
        "etcd",
        "go.etcd.io/etcd/server/v3",
        {"etcd": "go.etcd.io/etcd/server/v3"},
        used_by="the control plane's store",
    ),
    ToolGroup(
        "helm",
        "helm.sh/helm/v4",
        {"helm": "helm.sh/helm/v4/cmd/helm"},
        _helm_ldflags,
        used_by="the chart tests and the cluster installs",
    ),
    ToolGroup(
        "prometheus",
        "github.com/prometheus/prometheus",
        {
            "promtool": "github.com/prometheus/prometheus/cmd/promtool",
            "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
        },
        _prometheus_ldflags,
        # Prometheus' documented tags: leave out a dozen cloud service-discovery SDKs that
        # neither the rule checks nor the in-cluster server use (more than halving a cold
        # build), keeping the Kubernetes discovery the chart's scrape configuration needs.
        tags=("remove_all_sd", "enable_kubernetes_sd"),
        used_by="the alert rules' checks, the dashboards' PromQL, the in-cluster Prometheus",
    ),
    ToolGroup(
        "jaeger",
        "github.com/jaegertracing/jaeger",
        {"jaeger": "github.com/jaegertracing/jaeger/cmd/jaeger"},
        used_by="the OTLP trace backend of the trace test (Apache-2.0; Tempo is AGPL)",
    ),
    ToolGroup(
        "coredns",
        "github.com/coredns/coredns",
        {"coredns": "github.com/coredns/coredns"},
        used_by="the cluster DNS of `dtx cluster up`",
    ),
)


def group(name: str) -> ToolGroup:
    for g in GROUPS:
        if g.name == name:
            return g
    raise InfraError(f"no tool group {name!r}; known: {', '.join(g.name for g in GROUPS)}")


def group_of(binary_name: str) -> ToolGroup:
    for g in GROUPS:
        if binary_name in g.binaries:
            return g
    raise InfraError(f"no tool named {binary_name!r} in the toolchain")


def binary(name: str) -> Path:
    """The path of a built tool; never builds. Missing: :class:`ToolMissing` naming the fix."""
    g = group_of(name)
    if not g.is_built():
        raise ToolMissing(
            f"{name} ({g.name} {g.version()}) is not built: run `make tools` first "
            f"(or `.venv/bin/dtx toolchain build {g.name}`); expected in {g.bin_dir()}"
        )
    return g.bin_dir() / name


def _go() -> str:
    go = os.environ.get("GO") or shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise InfraError("the Go toolchain (go) is required to build dtx's tools; none found")
    return go


def fmt_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def say(line: str) -> None:
    print(f"toolchain: {line}", file=sys.stderr, flush=True)


def build_group(g: ToolGroup, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """Build ``g`` into its cache directory unless it is there; return the bin directory.

    Concurrent callers wait on one lock per group instead of racing. Output goes to a log
    next to the binaries; a heartbeat line shows every minute that a long build is alive.
    """
    version = g.version()
    names = ", ".join(g.binaries)
    if g.is_built():
        say(f"{g.name} {version} cached ({names})")
        return g.bin_dir()
    bin_dir = g.bin_dir()
    lock = cache_root() / f".{g.name}.lock"
    with file_lock(lock, timeout_s, f"building {g.name}"):
        if g.is_built():  # another process finished while we waited
            say(f"{g.name} {version} built by another process")
            return bin_dir
        shutil.rmtree(bin_dir.parent, ignore_errors=True)
        staging = bin_dir.parent.with_name(bin_dir.parent.name + ".tmp") / "bin"
        shutil.rmtree(staging.parent, ignore_errors=True)
        staging.mkdir(parents=True)
        log = staging.parent / "build.log"
        cmd = [
            "nice", "-n", "10", _go(), "build", "-trimpath",
            "-ldflags", f"-s -w {g.ldflags(version)}".strip(),
            *(["-tags", ",".join(g.tags)] if g.tags else []),
            # One package: name the file (go would call go.etcd.io/etcd/server/v3 "server").
            "-o", str(staging / next(iter(g.binaries))) if len(g.binaries) == 1
            else str(staging) + "/",
            *g.binaries.values(),
        ]  # fmt: skip
        env = {
            **os.environ,
            "CGO_ENABLED": "0",
            # Only what go.sum pins is fetched; a build never edits the consumer module.
            "GOFLAGS": "-mod=readonly -buildvcs=false",
            **g.env,
        }
        say(f"building {g.name} {version} ({names}); log {log}")
        start = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=g.module_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            stop = threading.Event()

            def heartbeat() -> None:
                while not stop.wait(HEARTBEAT_S):
                    say(f"still building {g.name} ({fmt_duration(time.monotonic() - start)})")

            beat = threading.Thread(target=heartbeat, daemon=True)
            beat.start()
            try:
                code = proc.wait(timeout=timeout_s)
            except BaseException:
                os.killpg(proc.pid, 9)  # no stray compiler left eating the CPU
                proc.wait()
                raise
            finally:
                stop.set()
        if code != 0:
            raise InfraError(
                f"building {g.name} {version} failed (exit {code}); log {log}",
                tail_file(log),
            )
        absent = [b for b in g.binaries if not os.access(staging / b, os.X_OK)]
        if absent:
            raise InfraError(f"building {g.name} made no {', '.join(absent)}; log {log}")
        (staging / ".complete").write_text(f"{g.name} {version} {g.digest()}\n")
        staging.parent.rename(bin_dir.parent)  # atomic: never a half-filled bin directory
        say(f"built {g.name} {version} in {fmt_duration(time.monotonic() - start)}")
    return bin_dir


def build(names: Iterable[str] = ()) -> dict[str, Path]:
    """Build the named groups (all by default), one after the other; 2 cores gain nothing
    from two ``go build`` runs side by side, each already compiles two packages at a time."""
    wanted = [group(n) for n in names] or list(GROUPS)
    start = time.monotonic()
    dirs = {g.name: build_group(g) for g in wanted}
    say(f"{len(dirs)} group(s) ready in {fmt_duration(time.monotonic() - start)}")
    return dirs


def status() -> list[tuple[ToolGroup, bool]]:
    return [(g, g.is_built()) for g in GROUPS]
