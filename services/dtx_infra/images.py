"""The container images of the charts' pods, built on this machine without a Docker engine.

Why a step of its own: the project's machines reach package registries only (no image
registry, no Docker engine), yet a real cluster needs an image for every pod, the sandbox's
pause image included. ``dtx images build`` (``make images``) makes each one here from what
the registries give: Debian packages (mmdebstrap), the toolchain's Go binaries, Kafka's jars
from Maven Central, and the repository's Dockerfile (``buildah bud``). Each image is written
as an OCI archive into ``${DTX_CACHE_DIR:-~/.cache/dtx}/images`` and named by a digest of its
inputs, so an unchanged image is never rebuilt and finding one (:func:`archive`) needs no
build: the cluster code only finds and imports (:func:`import_into_containerd`).

How, and why so:

- Debian root filesystems come from mmdebstrap with the host's apt sources (the Debian
  mirror this machine already reaches), merged /usr set up by mmdebstrap's own hook rather
  than the usrmerge package (which would pull in Perl), no documentation, no apt lists.
- A root filesystem becomes an image with buildah (``from scratch``, ``mount``, a copy,
  ``config``, ``commit``): the same tool and storage as the Dockerfile build, which needs the
  local Python base in that storage anyway. The storage is private to dtx (under the cache).
- ``buildah bud`` runs the Dockerfile's RUN steps with runc (``--isolation oci``, which
  works here) on the host's network (``--network host``: no CNI network to set up, and the
  build's only traffic is PyPI's); its ``RUN --mount=type=cache`` keeps uv's downloads in
  the cache between builds. The Dockerfile is used unchanged: the local base carries
  ``SSL_CERT_FILE``/``PIP_CERT`` and the host's CAs, which pip and uv need behind the proxy.
- Content keys: for dtx the build context's files (less what .dockerignore leaves out) and
  the base's key; for the others their recipe (the files under ``image_files/`` and the
  settings below), the candidate versions of their Debian packages in the host's apt lists,
  and the hashes of the binaries and jars they carry.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from dtx_infra import kafka_jars, toolchain
from dtx_infra.errors import InfraError
from dtx_infra.locking import file_lock
from dtx_infra.procs import RunResult, run, tail_text

REPO_ROOT = Path(__file__).resolve().parents[2]
FILES = Path(__file__).with_name("image_files")
REGISTRY = "dtx.local"
SUITE = "bookworm"
KEY_LEN = 12
HEARTBEAT_S = 60.0
LOCK_TIMEOUT_S = 3 * 3600.0  # another process's whole cold build, with room
MMDEBSTRAP_TIMEOUT_S = 1800.0
BUD_TIMEOUT_S = 3600.0
STEP_TIMEOUT_S = 600.0
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# What the dtx image is built from: the Dockerfile's context, less what .dockerignore drops
# (tests/unit/test_images.py checks that these cover its "**/" patterns).
DTX_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md")
DTX_TREES = ("services", "operator")
IGNORED_DIRS = frozenset(
    {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".venv"}
    | {".dtx", ".git"}
)
IGNORED_FILES = ("*.pyc", "*.pyo", "*.pyd", ".DS_Store")

# dpkg leaves these out of every Debian root filesystem (the slim images' convention).
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageMissing(InfraError):
    """An image the cluster needs was not built; the message says to run ``make images``."""


@dataclass(frozen=True)
class ImageConfig:
    """The OCI image configuration ``buildah config`` writes (part of the content key)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    user: str = ""
    workdir: str = ""
    ports: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def as_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass(frozen=True)
class Recipe:
    """How to make one image: its inputs (digested into its tag) and its build."""

    name: str
    summary: str
    version: Callable[[], str]  # the human part of the tag, e.g. "15" or "v1.13.1"
    inputs: Callable[[], list[tuple[str, bytes]]]
    build: Callable[[Build], None]
    needs: tuple[str, ...] = ()  # images built (and present in the storage) first
    # Makes what the inputs digest and a build only may fetch (Kafka's jars).
    prepare: Callable[[], object] = lambda: None


@dataclass
class Build:
    """One image being built: where it goes, its log, and the step the heartbeat names."""

    recipe: Recipe
    ref: str
    buildah: Buildah
    log: Path
    step: str = "starting"
    started: float = field(default_factory=time.monotonic)

    def run(self, cmd: Sequence[str], what: str, timeout_s: float = STEP_TIMEOUT_S) -> str:
        """Run one step; its whole output goes to the image's log, its tail into errors."""
        self.step = what
        with self.log.open("a") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
        result = run(cmd, what=what, timeout_s=timeout_s, env=_clean_env(), check=False)
        with self.log.open("a") as out:
            out.write(result.output)
        if result.returncode != 0:
            raise InfraError(
                f"images: {self.recipe.name}: {what} failed (exit {result.returncode}); "
                f"log {self.log}",
                tail_text(result.output),
            )
        return result.output


# -- paths, names and content keys ------------------------------------------------------------


def cache_root() -> Path:
    return toolchain.cache_root().parent / "images"


def archive_path(name: str, tag: str) -> Path:
    return cache_root() / f"{name}-{tag}.oci.tar"


def make_ref(name: str, version: str, key: str) -> str:
    """``dtx.local/<name>:<version>-<key>``: the version for people, the key for the cache."""
    return f"{REGISTRY}/{name}:{version}-{key}" if version else f"{REGISTRY}/{name}:{key}"


def digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """The content key of labelled inputs (length-prefixed, so no two lists collide)."""
    h = hashlib.sha256()
    for label, data in parts:
        for chunk in (label.encode(), data):
            h.update(len(chunk).to_bytes(8, "big"))
            h.update(chunk)
    return h.hexdigest()[:KEY_LEN]


@cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, computed once per (path, size, mtime) in a process: `list` and
    `archive()` look at the same 100-MB binaries and jars again and again."""
    st = path.stat()
    return _file_sha256(path, st.st_size, st.st_mtime_ns)


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_FILES)


def tree_parts(root: Path, entries: Sequence[str]) -> list[tuple[str, bytes]]:
    """Each file under ``entries`` (relative to ``root``): its path, executable bit and
    content. Caches and bytecode are left out, as .dockerignore leaves them out of the
    context: running the tests must not change the dtx image's key."""
    parts: list[tuple[str, bytes]] = []
    for entry in entries:
        top = root / entry
        if not top.exists() and not top.is_symlink():
            parts.append((f"missing:{entry}", b""))
            continue
        for path in _walk(top):
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                parts.append((f"link:{rel}", os.readlink(path).encode()))
            else:
                mode = "x" if os.access(path, os.X_OK) else "-"
                parts.append((f"file:{rel}:{mode}", file_sha256(path).encode()))
    return parts


def _walk(top: Path) -> list[Path]:
    if not top.is_dir() or top.is_symlink():
        return [top]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(
            d for d in dirnames if d not in IGNORED_DIRS and not d.endswith(".egg-info")
        )
        found += [Path(dirpath) / f for f in sorted(filenames) if not _ignored(f)]
    return found


def parse_apt_policy(text: str) -> dict[str, str]:
    """``apt-cache policy A B``'s output -> {package: candidate version}."""
    versions: dict[str, str] = {}
    package = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1]
        elif package and line.strip().startswith("Candidate:"):
            versions[package] = line.split(":", 1)[1].strip()
    return versions


def apt_parts(packages: Sequence[str]) -> list[tuple[str, bytes]]:
    """The candidate version of each package in the host's apt lists, which name the same
    Debian mirror mmdebstrap uses: a point release or a security fix changes the key."""
    result = run(["apt-cache", "policy", *packages], what="apt-cache policy", timeout_s=60)
    versions = parse_apt_policy(result.output)
    return [(f"apt:{p}", versions.get(p, "(none)").encode()) for p in packages]


def recipe_file_parts(*names: str) -> list[tuple[str, bytes]]:
    return [(f"recipe:{n}", (FILES / n).read_bytes()) for n in names]


def host_ca_parts() -> list[tuple[str, bytes]]:
    return [("host-ca", HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b"")]


# -- the recipes' inputs ----------------------------------------------------------------------

PYTHON_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
PYTHON_CONFIG = ImageConfig(
    cmd=("python3",),
    env=(
        ("PATH", DEFAULT_PATH),
        ("LANG", "C.UTF-8"),
        # pip's and uv's trust: the system bundle, which holds the host's CAs too.
        ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        ("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"),
    ),
    labels=(("org.opencontainers.image.title", "python 3.11 (Debian bookworm) for dtx"),),
)
POSTGRES_PACKAGES = ("postgresql-15",)
POSTGRES_CONFIG = ImageConfig(
    entrypoint=("/usr/local/bin/docker-entrypoint.sh",),
    cmd=("postgres",),
    env=(
        ("PATH", f"/usr/lib/postgresql/15/bin:{DEFAULT_PATH}"),
        ("LANG", "C.UTF-8"),
        ("PGDATA", "/var/lib/postgresql/data"),
    ),
    user="999:999",
    ports=(5432,),
    labels=(("org.opencontainers.image.title", "PostgreSQL 15 (Debian bookworm) for dtx"),),
)
KAFKA_PACKAGES = ("openjdk-17-jre-headless",)
KAFKA_CONFIG = ImageConfig(
    entrypoint=("/usr/local/bin/kafka-entrypoint.sh",),
    env=(
        ("PATH", DEFAULT_PATH),
        ("LANG", "C.UTF-8"),
        ("JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64"),
        ("KAFKA_HOME", "/opt/kafka"),
    ),
    user="1000:1000",
    workdir="/opt/kafka",
    ports=(9092, 9093),
    labels=(("org.opencontainers.image.title", "Apache Kafka (Debian OpenJDK 17) for dtx"),),
)


@dataclass(frozen=True)
class GoImage:
    """A toolchain binary on an otherwise empty root: passwd, group and /tmp only."""

    binary: str
    uid: int  # the user the chart (or upstream's image) runs it as
    user: str
    workdir: str = "/"
    dirs: tuple[str, ...] = ()  # created owned by the user (e.g. Prometheus' /prometheus)

    def config(self) -> ImageConfig:
        return ImageConfig(
            entrypoint=(f"/usr/bin/{self.binary}",),
            user=f"{self.uid}:{self.uid}",
            workdir=self.workdir,
            labels=(("org.opencontainers.image.title", f"{self.binary} for dtx"),),
        )


GO_IMAGES = {
    # upstream's coredns image runs as distroless' nonroot
    "coredns": GoImage("coredns", 65532, "nonroot"),
    # observability/chart: prometheus.uid 65534, jaeger.uid 10001
    "prometheus": GoImage("prometheus", 65534, "nobody", "/prometheus", ("/prometheus",)),
    "jaeger": GoImage("jaeger", 10001, "jaeger"),
}


def _gcc_version() -> str:
    cc = shutil.which("gcc")
    if cc is None:
        raise InfraError("images: gcc is required for the pause image: apt-get install gcc")
    return run([cc, "--version"], what="gcc --version", timeout_s=30).output.splitlines()[0]


def _pause_inputs() -> list[tuple[str, bytes]]:
    return [*recipe_file_parts("pause.c"), ("cc", _gcc_version().encode())]


def _python_inputs() -> list[tuple[str, bytes]]:
    spec = ("minbase", PYTHON_PACKAGES, DPKG_EXCLUDES, PYTHON_CONFIG.as_json())
    return [
        ("spec", json.dumps(spec).encode()),
        *recipe_file_parts("python-base.customize.sh"),
        *apt_parts(PYTHON_PACKAGES),
        *host_ca_parts(),
    ]


def _dtx_inputs() -> list[tuple[str, bytes]]:
    return [("base", ref("python").encode()), *tree_parts(REPO_ROOT, DTX_INPUTS + DTX_TREES)]


def _postgres_inputs() -> list[tuple[str, bytes]]:
    spec = ("essential", POSTGRES_PACKAGES, DPKG_EXCLUDES, POSTGRES_CONFIG.as_json())
    return [
        ("spec", json.dumps(spec).encode()),
        *recipe_file_parts(
            "postgresql.essential.sh", "postgresql.customize.sh", "postgresql-entrypoint.sh"
        ),
        *apt_parts(POSTGRES_PACKAGES),
    ]


def _kafka_libs() -> Path:
    cache_dir = toolchain.cache_root().parent
    if not kafka_jars.jars_are_cached(cache_dir):
        raise ImageMissing(
            f"Kafka {kafka_jars.KAFKA_VERSION}'s jars are not resolved: run `make images` "
            "(or `make tools`)"
        )
    return kafka_jars.libs_dir(cache_dir)


def _kafka_inputs() -> list[tuple[str, bytes]]:
    spec = ("essential", KAFKA_PACKAGES, DPKG_EXCLUDES, KAFKA_CONFIG.as_json())
    libs = _kafka_libs()
    return [
        ("spec", json.dumps(spec).encode()),
        *recipe_file_parts("kafka.customize.sh", "kafka-entrypoint.sh"),
        *apt_parts(KAFKA_PACKAGES),
        *[(f"jar:{j.name}", file_sha256(j).encode()) for j in sorted(libs.glob("*.jar"))],
    ]


def _go_binary(name: str) -> Path:
    try:
        return toolchain.binary(GO_IMAGES[name].binary)
    except toolchain.ToolMissing as exc:
        raise ImageMissing(f"images: {name}: {exc.summary}; then `make images`") from None


def _go_inputs(name: str) -> Callable[[], list[tuple[str, bytes]]]:
    def inputs() -> list[tuple[str, bytes]]:
        image = GO_IMAGES[name]
        spec = json.dumps([image.__dict__, image.config().as_json()], sort_keys=True)
        return [("spec", spec.encode()), ("binary", file_sha256(_go_binary(name)).encode())]

    return inputs


# -- building root filesystems ----------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """The environment of every build step: the host's PIP_*, SSL_* and similar settings
    point at paths of the host and must not leak into a chroot or a RUN step."""
    keep = ("PATH", "HOME", "TMPDIR", "http_proxy", "https_proxy", "no_proxy")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env["LANG"] = "C.UTF-8"
    return env


def apt_sources() -> list[Path]:
    """The host's Debian sources for the suite: its deb822 and one-line files that name
    ``bookworm`` as a suite (a third-party repository's file does not)."""
    override = os.environ.get("DTX_IMAGES_APT_SOURCES")
    if override:
        return [Path(p) for p in override.split(":") if p]
    candidates = [Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    suite = re.compile(rf"(^|\s){SUITE}(\s|$)", re.M)
    found = [p for p in candidates if p.is_file() and suite.search(_active_lines(p))]
    if not found:
        raise InfraError(f"images: no apt source of Debian {SUITE} in /etc/apt on this host")
    return found


def _active_lines(path: Path) -> str:
    return "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )


def _hook(script: str) -> str:
    """A hook running one of image_files' scripts on the root (mmdebstrap passes it as $1)."""
    return f'sh {shlex.quote(str(FILES / script))} "$1"'


def mmdebstrap_cmd(
    rootfs: Path,
    variant: str,
    packages: Sequence[str],
    essential_hooks: Sequence[str] = (),
    customize_hooks: Sequence[str] = (),
) -> list[str]:
    """The mmdebstrap command line of a Debian root filesystem (``--mode=root``: we are)."""
    cmd = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={variant}",
        f"--hook-dir={MERGED_USR_HOOKS}",
        '--aptopt=Acquire::Languages "none"',
        '--aptopt=APT::Install-Recommends "false"',
        *[f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES],
        f"--include={','.join(packages)}",
    ]
    cmd += [f"--essential-hook={h}" for h in essential_hooks]
    cmd += [f"--customize-hook={h}" for h in customize_hooks]
    return [*cmd, SUITE, str(rootfs), *map(str, apt_sources())]


def slim(rootfs: Path) -> None:
    """What no image needs: device nodes (the runtime makes /dev), logs, apt's caches and
    lists, dpkg's and debconf's backups, temporary files."""
    for pattern in (
        "dev/*",
        "tmp/*",
        "var/tmp/*",
        "var/log/**/*.log",
        "var/log/apt/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*_*",
        "var/cache/debconf/*-old",
        "var/lib/dpkg/*-old",
        "var/cache/ldconfig/aux-cache",
        "root/.cache",
    ):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def write_minimal_root(rootfs: Path, users: Sequence[tuple[str, int]]) -> None:
    """/etc/passwd and /etc/group naming root, nobody and ``users``, and /tmp: all that a
    static binary on an empty image needs (a user name for its uid, a temporary directory)."""
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    entries = {"root": 0, "nobody": 65534, **dict(users)}
    passwd = [
        f"{n}:x:{uid}:{uid}:{n}:{'/root' if uid == 0 else '/nonexistent'}:/sbin/nologin"
        for n, uid in sorted(entries.items(), key=lambda e: e[1])
    ]
    group = [f"{n}:x:{uid}:" for n, uid in sorted(entries.items(), key=lambda e: e[1])]
    (rootfs / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
    (rootfs / "etc" / "group").write_text("\n".join(group) + "\n")
    tmp = rootfs / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)


@contextlib.contextmanager
def _staging(b: Build) -> Iterator[Path]:
    """A scratch directory (root-owned, on the cache's file system) for a root filesystem."""
    work = Path(tempfile.mkdtemp(prefix=f"{b.recipe.name}-", dir=b.buildah.tmpdir))
    try:
        yield work / "rootfs"
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- buildah ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buildah:
    """buildah on dtx's own storage, so that nothing here touches (or is touched by) another
    user of /var/lib/containers, and its TMPDIR (where ``RUN --mount=type=cache`` keeps
    uv's downloads) lives in the cache too."""

    root: Path

    @property
    def tmpdir(self) -> Path:
        return self.root / "tmp"

    def cmd(self, *args: str) -> list[str]:
        runroot = Path("/run") / f"dtx-images-{hashlib.sha256(bytes(self.root)).hexdigest()[:8]}"
        return [
            "env",
            f"TMPDIR={self.tmpdir}",
            "buildah",
            f"--root={self.root / 'storage'}",
            f"--runroot={runroot}",
            "--storage-driver=overlay",
            *args,
        ]

    def has_image(self, ref: str) -> bool:
        probe = run(
            self.cmd("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref),
            what=f"buildah inspect {ref}",
            timeout_s=60,
            check=False,
        )
        return probe.returncode == 0

    def images(self, repository: str) -> list[str]:
        listing = run(
            self.cmd("images", "--noheading", "--format", "{{.Name}}:{{.Tag}}"),
            what="buildah images",
            timeout_s=60,
        )
        return [r for r in listing.output.split() if r.startswith(f"{repository}:")]


def _config_args(config: ImageConfig) -> list[str]:
    args = [
        "--os=linux",
        "--entrypoint",
        json.dumps(list(config.entrypoint)),
        "--cmd",
        json.dumps(list(config.cmd)) if config.cmd else "",
    ]
    args += [f"--env={k}={v}" for k, v in config.env]
    args += [f"--label={k}={v}" for k, v in config.labels]
    args += [f"--port={p}" for p in config.ports]
    if config.user:
        args.append(f"--user={config.user}")
    if config.workdir:
        args.append(f"--workingdir={config.workdir}")
    return args


def commit_rootfs(b: Build, rootfs: Path, config: ImageConfig) -> None:
    """One layer from a root filesystem: a scratch container, its root mounted, the tree
    copied in with owners, modes and links as they are (``cp -a``), configured, committed."""
    bh = b.buildah
    name = f"dtx-images-{b.recipe.name}"
    run(bh.cmd("rm", name), what="buildah rm", timeout_s=60, check=False)  # a crash's leftover
    container = b.run(bh.cmd("from", "--name", name, "scratch"), "buildah from")
    container = container.strip().splitlines()[-1]
    try:
        mount = b.run(bh.cmd("mount", container), "buildah mount").strip().splitlines()[-1]
        b.run(["cp", "-a", f"{rootfs}/.", f"{mount}/"], "copying the root filesystem in")
        b.run(bh.cmd("umount", container), "buildah umount")
        b.run(bh.cmd("config", *_config_args(config), container), "buildah config")
        b.run(bh.cmd("commit", "--quiet", "--rm", container, b.ref), "buildah commit")
    except BaseException:
        run(bh.cmd("rm", container), what="buildah rm", timeout_s=60, check=False)
        raise


# -- the builds -------------------------------------------------------------------------------


def _build_pause(b: Build) -> None:
    with _staging(b) as rootfs:
        write_minimal_root(rootfs, [])
        (rootfs / "usr" / "bin").mkdir(parents=True)
        cc = shutil.which("gcc") or "gcc"
        out = rootfs / "usr" / "bin" / "pause"
        b.run([cc, "-Os", "-static", "-s", "-o", str(out), str(FILES / "pause.c")], "gcc pause.c")
        config = ImageConfig(
            entrypoint=("/usr/bin/pause",),
            user="65535:65535",  # upstream pause's uid: it needs no privilege at all
            labels=(("org.opencontainers.image.title", "pod sandbox pause for dtx"),),
        )
        commit_rootfs(b, rootfs, config)


def _build_python(b: Build) -> None:
    with _staging(b) as rootfs:
        b.run(
            mmdebstrap_cmd(
                rootfs,
                "minbase",
                PYTHON_PACKAGES,
                customize_hooks=[
                    f"upload {shlex.quote(str(HOST_CA_BUNDLE))} /tmp/host-ca.crt",
                    _hook("python-base.customize.sh"),
                ],
            ),
            "mmdebstrap (python3.11)",
            MMDEBSTRAP_TIMEOUT_S,
        )
        slim(rootfs)
        commit_rootfs(b, rootfs, PYTHON_CONFIG)


def _build_dtx(b: Build) -> None:
    base = ref("python")
    cmd = b.buildah.cmd(
        "bud",
        "--isolation=oci",
        "--network=host",
        "--pull-never",
        # No layer cache: uv's download cache (the Dockerfile's cache mounts) is what makes
        # a rebuild fast, and without intermediate images the storage holds just one dtx.
        "--layers=false",
        "--force-rm",
        f"--build-arg=PYTHON_IMAGE={base}",
        f"--tag={b.ref}",
        f"--file={REPO_ROOT / 'Dockerfile'}",
        str(REPO_ROOT),
    )
    b.run(cmd, "buildah bud (the Dockerfile)", BUD_TIMEOUT_S)


def _build_postgresql(b: Build) -> None:
    with _staging(b) as rootfs:
        entrypoint = FILES / "postgresql-entrypoint.sh"
        cmd = mmdebstrap_cmd(
            rootfs,
            "essential",
            POSTGRES_PACKAGES,
            essential_hooks=[_hook("postgresql.essential.sh")],
            customize_hooks=[
                f"upload {shlex.quote(str(entrypoint))} /usr/local/bin/docker-entrypoint.sh",
                _hook("postgresql.customize.sh"),
            ],
        )
        b.run(cmd, "mmdebstrap (postgresql-15)", MMDEBSTRAP_TIMEOUT_S)
        slim(rootfs)
        commit_rootfs(b, rootfs, POSTGRES_CONFIG)


def _ensure_jars() -> Path:
    return kafka_jars.ensure_kafka_jars(toolchain.cache_root().parent)


def _build_kafka(b: Build) -> None:
    libs = _ensure_jars()
    with _staging(b) as rootfs:
        entrypoint = FILES / "kafka-entrypoint.sh"
        cmd = mmdebstrap_cmd(
            rootfs,
            "essential",
            KAFKA_PACKAGES,
            # openjdk's postinst links its man page there, and fails when it is missing.
            essential_hooks=['mkdir -p "$1/usr/share/man/man1"'],
            customize_hooks=[
                'mkdir -p "$1/opt/kafka"',
                f"copy-in {shlex.quote(str(libs))} /opt/kafka",
                f"upload {shlex.quote(str(entrypoint))} /usr/local/bin/kafka-entrypoint.sh",
                _hook("kafka.customize.sh"),
            ],
        )
        b.run(cmd, "mmdebstrap (openjdk-17-jre-headless)", MMDEBSTRAP_TIMEOUT_S)
        slim(rootfs)
        commit_rootfs(b, rootfs, KAFKA_CONFIG)


def _build_go(name: str) -> Callable[[Build], None]:
    def build(b: Build) -> None:
        image = GO_IMAGES[name]
        binary = _go_binary(name)
        _check_static(b, binary)
        with _staging(b) as rootfs:
            write_minimal_root(rootfs, [(image.user, image.uid)])
            target = rootfs / "usr" / "bin" / image.binary
            target.parent.mkdir(parents=True)
            shutil.copyfile(binary, target)
            target.chmod(0o755)
            for d in image.dirs:
                path = rootfs / d.lstrip("/")
                path.mkdir(parents=True, exist_ok=True)
                os.chown(path, image.uid, image.uid)
            commit_rootfs(b, rootfs, image.config())

    return build


def _check_static(b: Build, binary: Path) -> None:
    """An empty image has no dynamic loader: a binary built with cgo would not start."""
    with binary.open("rb") as fh:
        head = fh.read(1 << 16)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise InfraError(f"images: {b.recipe.name}: {binary} is dynamically linked (CGO?)")


def _tool_version(name: str) -> Callable[[], str]:
    return lambda: toolchain.group_of(GO_IMAGES[name].binary).version()


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("pause", "the pod sandbox (containerd's sandbox_image)", lambda: "",
               _pause_inputs, _build_pause),
        Recipe("python", "Debian's python3.11 as python:3.11-slim-bookworm (dtx's base)",
               lambda: "3.11", _python_inputs, _build_python),
        Recipe("dtx", "the services and the operator (the repository's Dockerfile)",
               lambda: "", _dtx_inputs, _build_dtx, needs=("python",)),
        Recipe("postgresql", "Debian's PostgreSQL 15, the official image's conventions",
               lambda: "15", _postgres_inputs, _build_postgresql),
        Recipe("kafka", "Kafka's jars on Debian's OpenJDK 17, apache/kafka's conventions",
               lambda: kafka_jars.KAFKA_VERSION, _kafka_inputs, _build_kafka,
               prepare=_ensure_jars),
        *(
            Recipe(n, f"the toolchain's {n}, static, on an empty root", _tool_version(n),
                   _go_inputs(n), _build_go(n))
            for n in GO_IMAGES
        ),
    )
}  # fmt: skip
NAMES = tuple(RECIPES)
# What a cluster imports: every image but the Python base (only dtx's build uses it).
CLUSTER_IMAGES = tuple(n for n in NAMES if n != "python")


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InfraError(f"images: no image {name!r}; known: {', '.join(NAMES)}")
    return RECIPES[name]


def ref(name: str) -> str:
    """The image's reference for its current inputs (computed, never built)."""
    r = recipe(name)
    return make_ref(name, r.version(), digest(r.inputs()))


def archive(name: str) -> tuple[str, Path]:
    """The reference and OCI archive of the built image; never builds. Missing:
    :class:`ImageMissing`, naming ``make images``."""
    image_ref = ref(name)
    path = archive_path(name, image_ref.rsplit(":", 1)[1])
    if not path.is_file():
        raise ImageMissing(
            f"image {name} ({image_ref}) is not built: run `make images` first "
            f"(or `.venv/bin/dtx images build {name}`); expected {path}"
        )
    return image_ref, path


# -- progress ---------------------------------------------------------------------------------


def say(line: str) -> None:
    print(f"images: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _heartbeat(b: Build) -> Iterator[None]:
    """A line a minute while a long step runs, so that a log shows the build is alive."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            elapsed = toolchain.fmt_duration(time.monotonic() - b.started)
            say(f"still building {b.recipe.name}: {b.step} ({elapsed})")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


# -- build ------------------------------------------------------------------------------------


def _preflight() -> None:
    if os.geteuid() != 0:
        raise InfraError("images: building needs root (mmdebstrap's root mode, buildah)")
    for tool in ("buildah", "mmdebstrap", "apt-cache"):
        if shutil.which(tool) is None:
            raise InfraError(f"images: {tool} is required: apt-get install {tool}")


def _with_needs(names: Iterable[str]) -> list[str]:
    """The images asked for and those they need, in build order."""
    ordered: list[str] = []

    def add(name: str) -> None:
        for need in recipe(name).needs:
            add(need)
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return ordered


def build(names: Iterable[str] = ()) -> dict[str, tuple[str, Path]]:
    """Build the named images (all by default) unless cached; return each one's reference
    and archive. Parallel callers wait on one lock; one start and one end line per image."""
    wanted = _with_needs(names or NAMES)
    started = time.monotonic()
    built: dict[str, tuple[str, Path]] = {}
    bh = Buildah(cache_root())
    for name in wanted:
        built[name] = _build_one(bh, name)
    say(f"{len(built)} image(s) ready in {toolchain.fmt_duration(time.monotonic() - started)}")
    return built


def _build_one(bh: Buildah, name: str) -> tuple[str, Path]:
    recipe(name).prepare()
    image_ref = ref(name)
    path = archive_path(name, image_ref.rsplit(":", 1)[1])
    if path.is_file():
        say(f"{name} cached ({image_ref})")
        return image_ref, path
    _preflight()
    with file_lock(cache_root() / ".build.lock", LOCK_TIMEOUT_S, "building images"):
        if path.is_file():  # another process built it while we waited
            say(f"{name} built by another process ({image_ref})")
            return image_ref, path
        bh.tmpdir.mkdir(parents=True, exist_ok=True)
        log = cache_root() / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{time.ctime()}: building {image_ref}\n")
        b = Build(recipe(name), image_ref, bh, log)
        say(f"building {name} ({image_ref}): {b.recipe.summary}; log {log}")
        for need in b.recipe.needs:
            _ensure_in_storage(b, need)
        with _heartbeat(b):
            b.recipe.build(b)
            _push(b, path)
            size = _image_size(b)
            _prune(b)
        say(
            f"built {name} in {toolchain.fmt_duration(time.monotonic() - b.started)} "
            f"({size}, archive {_mb(path.stat().st_size)})"
        )
    return image_ref, path


def _ensure_in_storage(b: Build, name: str) -> None:
    """A base built earlier may have left the storage (pruned, or a new cache): load its
    archive back (from the file, not a registry)."""
    need_ref, need_path = archive(name)
    if not b.buildah.has_image(need_ref):
        b.run(b.buildah.cmd("pull", "--quiet", f"oci-archive:{need_path}"), f"loading {name}")


def _push(b: Build, path: Path) -> None:
    """The OCI archive ``ctr images import`` takes, written under a temporary name and
    renamed: an archive that exists is complete."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        b.run(
            b.buildah.cmd("push", "--quiet", b.ref, f"oci-archive:{partial}:{b.ref}"),
            "buildah push (OCI archive)",
        )
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)


def _prune(b: Build) -> None:
    """Older builds of this image leave the storage and the cache. Only the Python base
    (dtx's FROM) and dtx (its layers are the next build's cache) stay in the storage; the
    others live on as their archives alone."""
    repository = b.ref.rsplit(":", 1)[0]
    keep_current = b.recipe.name in ("python", "dtx")
    stale = [r for r in b.buildah.images(repository) if r != b.ref or not keep_current]
    if stale:
        b.run(b.buildah.cmd("rmi", *stale), "removing older images from the storage")
    if b.recipe.name == "dtx":  # whatever an interrupted build left without a name
        b.run(b.buildah.cmd("rmi", "--prune"), "pruning unnamed images")
    current = archive_path(b.recipe.name, b.ref.rsplit(":", 1)[1])
    for old in stale_archives(cache_root(), b.recipe.name, current):
        old.unlink(missing_ok=True)


def stale_archives(root: Path, name: str, current: Path) -> list[Path]:
    """The archives of older builds of ``name`` (exactly that name: not a longer one)."""
    own = re.compile(rf"^{re.escape(name)}-(?:[A-Za-z0-9_.]+-)?[0-9a-f]{{{KEY_LEN}}}\.oci\.tar$")
    return [p for p in sorted(root.glob(f"{name}-*.oci.tar")) if own.match(p.name) and p != current]


def _image_size(b: Build) -> str:
    if not b.buildah.has_image(b.ref):
        return "size n/a"
    out = run(
        b.buildah.cmd("images", "--noheading", "--format", "{{.Size}}", b.ref),
        what="buildah images",
        timeout_s=60,
        check=False,
    ).output.strip()
    return out.splitlines()[0] if out else "size n/a"


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStatus:
    name: str
    summary: str
    ref: str  # empty when its inputs are not there (a tool or the jars not yet made)
    archive: Path | None  # None: not built
    note: str  # the archive's size, or what is missing


def status() -> list[ImageStatus]:
    """Each image: its reference for the current inputs, and whether it is built."""
    found: list[ImageStatus] = []
    for name, r in RECIPES.items():
        try:
            image_ref = ref(name)
        except InfraError as exc:
            found.append(ImageStatus(name, r.summary, "", None, exc.summary))
            continue
        path = archive_path(name, image_ref.rsplit(":", 1)[1])
        built = path.is_file()
        note = _mb(path.stat().st_size) if built else "not built"
        found.append(ImageStatus(name, r.summary, image_ref, path if built else None, note))
    return found


# -- containerd -------------------------------------------------------------------------------


def _ctr(ctr_binary: str, address: str, *args: str) -> list[str]:
    return [ctr_binary, "--address", address, "--namespace", "k8s.io", *args]


def containerd_refs(ctr_binary: str, address: str) -> set[str]:
    """The image references the containerd at ``address`` holds in namespace k8s.io."""
    out: RunResult = run(
        _ctr(ctr_binary, address, "images", "list", "--quiet"),
        what=f"ctr images list ({address})",
        timeout_s=60,
    )
    return set(out.output.split())


def import_into_containerd(
    ctr_binary: str, address: str, names: Iterable[str] = CLUSTER_IMAGES
) -> None:
    """Import into namespace k8s.io (the CRI's) the named images that containerd lacks.

    Every archive is looked up first, so a missing image fails before anything is imported.
    """
    wanted = [(name, *archive(name)) for name in names]
    present = containerd_refs(ctr_binary, address)
    for name, image_ref, path in wanted:
        if image_ref in present:
            say(f"{name} already in containerd ({image_ref})")
            continue
        started = time.monotonic()
        run(
            _ctr(ctr_binary, address, "images", "import", str(path)),
            what=f"importing {name} into containerd ({address})",
            timeout_s=STEP_TIMEOUT_S,
        )
        say(f"imported {name} in {toolchain.fmt_duration(time.monotonic() - started)}")
    missing = {r for _, r, _ in wanted} - containerd_refs(ctr_binary, address)
    if missing:
        raise InfraError(f"images: ctr import left out {', '.join(sorted(missing))}")
