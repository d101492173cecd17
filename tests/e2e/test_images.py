"""The images `make images` built, imported into a containerd of the test's own and run.

Never builds: :func:`dtx_infra.images.archive` finds the archives, and fails naming
`make images` when one is missing. What is checked is what the cluster and the charts rely
on: ``ctr images import`` takes the archives under their references (a second import is a
no-op); the dtx image's configuration is the Dockerfile's (uid 10001, entrypoint ``dtx``)
and it runs, as does the Python base; the pause image exits on SIGTERM; the Go images'
entrypoints run; and PostgreSQL and Kafka start the way charts/dtx runs them: as the
chart's uid, read-only root filesystem, volumes where the chart mounts them, the chart's
environment, arguments and init script.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dtx_infra import images
from tests.support.private_containerd import PrivateContainerd, private_containerd

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("python", "dtx")


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    """The references of the built images, looked up once: a file edited in services/ while
    the tests run changes dtx's key, not the image under test."""
    return {name: images.archive(name)[0] for name in NAMES}  # missing: names `make images`


@pytest.fixture(scope="module")
def containerd(refs: dict[str, str]) -> Iterator[PrivateContainerd]:
    with private_containerd() as ctd:
        images.import_into_containerd(ctd.ctr_binary, ctd.address, NAMES)
        yield ctd


def imported(ctd: PrivateContainerd, name: str) -> str:
    ref = images.archive(name)[0]
    images.import_into_containerd(ctd.ctr_binary, ctd.address, [name])
    return ref


def content(ctd: PrivateContainerd, digest: str) -> Any:
    out = ctd.ctr("content", "get", digest)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def image_config(ctd: PrivateContainerd, ref: str) -> Any:
    listing = ctd.ctr("images", "list", f"name=={ref}")
    assert listing.returncode == 0, listing.stderr
    [row] = [line.split() for line in listing.stdout.splitlines()[1:] if line.strip()]
    manifest = content(ctd, row[2])  # REF TYPE DIGEST ...
    return content(ctd, manifest["config"]["digest"])["config"]


def run(ctd: PrivateContainerd, ref: str, *cmd: str) -> str:
    """``ctr run --rm`` of the image (its own user, a fresh snapshot); stdout."""
    out = ctd.ctr("run", "--rm", ref, f"dtx-test-{uuid.uuid4().hex[:8]}", *cmd, timeout_s=180)
    assert out.returncode == 0, f"{cmd} in {ref}: {out.stdout}\n{out.stderr}"
    return out.stdout


@contextmanager
def volumes(uid: int, *names: str) -> Iterator[Path]:
    """Host directories owned by ``uid``, as the chart's volumes are (fsGroup)."""
    base = Path(tempfile.mkdtemp(prefix="dtx-vol-"))
    base.chmod(0o755)
    try:
        for name in names:
            (base / name).mkdir()
            os.chown(base / name, uid, uid)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def detached(ctd: PrivateContainerd, ref: str, *args: str) -> Iterator[str]:
    """``ctr run -d --read-only``: the container's id; killed and deleted afterwards."""
    cid = f"dtx-test-{uuid.uuid4().hex[:8]}"
    out = ctd.ctr("run", "--detach", "--read-only", *args, ref, cid)
    assert out.returncode == 0, out.stderr
    try:
        yield cid
    finally:
        ctd.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        ctd.ctr("tasks", "delete", "--force", cid)
        ctd.ctr("containers", "delete", cid)


def task_status(ctd: PrivateContainerd, cid: str) -> str:
    for line in ctd.ctr("tasks", "list").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return "GONE"


def wait_for(what: str, check: Any, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            pytest.fail(f"no {what} within {timeout_s:.0f}s\n{tail}")
        time.sleep(0.5)


def stops_on_sigterm(ctd: PrivateContainerd, cid: str, timeout_s: float = 30) -> None:
    assert ctd.ctr("tasks", "kill", cid).returncode == 0  # SIGTERM, the kubelet's first
    wait_for(f"{cid} stopped on SIGTERM", lambda: task_status(ctd, cid) == "STOPPED", timeout_s)


def test_import_names_the_images_and_is_done_once(
    containerd: PrivateContainerd, refs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    present = set(containerd.ctr("images", "list", "--quiet").stdout.split())
    assert set(refs.values()) <= present
    capsys.readouterr()
    images.import_into_containerd(containerd.ctr_binary, containerd.address, NAMES)
    err = capsys.readouterr().err
    assert "imported" not in err
    assert err.count("already in containerd") == len(NAMES)


def test_dtx_image_runs_as_10001_with_entrypoint_dtx(
    containerd: PrivateContainerd, refs: dict[str, str]
) -> None:
    ref = refs["dtx"]
    config = image_config(containerd, ref)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["dtx"]
    assert config["WorkingDir"] == "/app"
    assert "Usage: dtx" in run(containerd, ref, "/opt/dtx/venv/bin/dtx", "--help")
    uid = run(containerd, ref, "/opt/dtx/venv/bin/python", "-c", "import os; print(os.getuid())")
    assert uid.strip() == "10001"


def test_python_base_is_laid_out_like_the_official_slim_image(
    containerd: PrivateContainerd, refs: dict[str, str]
) -> None:
    ref = refs["python"]
    code = (
        "import os, sys, pip; "
        "print(sys.version_info[:2], pip.__file__.startswith('/usr/local/'), "
        "os.path.exists('/usr/lib/python3.11/EXTERNALLY-MANAGED'))"
    )
    out = run(containerd, ref, "/usr/local/bin/python", "-c", code)
    assert out.splitlines()[0] == "(3, 11) True False"


def test_pause_holds_the_sandbox_and_exits_on_sigterm(containerd: PrivateContainerd) -> None:
    ref = imported(containerd, "pause")
    with detached(containerd, ref) as cid:
        time.sleep(1)
        assert task_status(containerd, cid) == "RUNNING"
        stops_on_sigterm(containerd, cid, timeout_s=10)


@pytest.mark.parametrize(
    ("name", "args", "expect"),
    [
        ("coredns", ["-version"], "CoreDNS-1."),
        ("prometheus", ["--version"], "prometheus, version 3."),
        ("jaeger", ["version"], "gitVersion"),
    ],
)
def test_go_images_run_their_binary_as_non_root(
    containerd: PrivateContainerd, name: str, args: list[str], expect: str
) -> None:
    ref = imported(containerd, name)
    config = image_config(containerd, ref)
    assert config["Entrypoint"] == [f"/usr/bin/{name}"]
    assert not config["User"].startswith("0")
    assert expect in run(containerd, ref, f"/usr/bin/{name}", *args)


def test_postgresql_runs_as_the_chart_runs_it(containerd: PrivateContainerd) -> None:
    ref = imported(containerd, "postgresql")
    mounts = {
        "data": "/var/lib/postgresql/data",
        "run": "/var/run/postgresql",
        "tmp": "/tmp",
        "init": "/docker-entrypoint-initdb.d",
    }
    with volumes(999, *mounts) as vol:
        script = vol / "init" / "10-dtx-databases.sh"
        shutil.copyfile(ROOT / "charts" / "dtx" / "files" / "postgres-init.sh", script)
        script.chmod(0o555)
        env = {
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "super-secret",
            "PGDATA": "/var/lib/postgresql/data/pgdata",
            "DTX_DB_PASSWORD_ORDERS": "orders-secret",
        }
        args = [
            *[a for src, dst in mounts.items() for a in _bind(vol / src, dst)],
            *[a for k, v in env.items() for a in ("--env", f"{k}={v}")],
        ]
        cid = f"dtx-test-{uuid.uuid4().hex[:8]}"
        server = ["-c", "max_prepared_transactions=256", "-c", "listen_addresses=*"]
        out = containerd.ctr("run", "--detach", "--read-only", *args, ref, cid,
                             "/usr/local/bin/docker-entrypoint.sh", *server)  # fmt: skip
        assert out.returncode == 0, out.stderr
        try:
            ready = ["pg_isready", "-U", "postgres", "-h", "127.0.0.1", "-p", "5432"]
            wait_for("pg_isready", lambda: _exec(containerd, cid, *ready)[0] == 0, 90)
            sql = (
                "select current_user, current_setting('max_prepared_transactions'), "
                "current_setting('server_version_num')::int / 10000"
            )
            tcp = "PGPASSWORD=orders-secret psql -h 127.0.0.1 -U orders -d orders -Atc"
            code, text = _exec(
                containerd, cid, "bash", "-c", f"{tcp} {json.dumps(sql)}; id -u", prints=True
            )
            assert code == 0, text
            assert text.split() == ["orders|256|15", "999"]
            code, text = _exec(containerd, cid, "touch", "/usr/local/x")
            assert code != 0
            assert "Read-only file system" in text
            stops_on_sigterm(containerd, cid, timeout_s=60)
        finally:
            containerd.ctr("tasks", "delete", "--force", cid)
            containerd.ctr("containers", "delete", cid)


def test_kafka_runs_as_the_chart_runs_it(containerd: PrivateContainerd) -> None:
    ref = imported(containerd, "kafka")
    mounts = {
        "data": "/var/lib/kafka/data",
        "config": "/opt/kafka/config",
        "logs": "/opt/kafka/logs",
        "tmp": "/tmp",
    }
    env = {  # charts/dtx/templates/kafka.yaml's, with the advertised name on loopback
        "CLUSTER_ID": "kpeukkEaQOmKmVGON6lN9Q",
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://127.0.0.1:9093",
        "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://127.0.0.1:9092",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@127.0.0.1:9093",
        "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
        "KAFKA_NUM_PARTITIONS": "3",
        "KAFKA_HEAP_OPTS": "-Xms128m -Xmx256m",
    }
    with volumes(1000, *mounts, "out") as vol:
        log = vol / "out" / "kafka.log"
        args = [
            "--log-uri",
            log.as_uri(),
            *[a for src, dst in mounts.items() for a in _bind(vol / src, dst)],
            *[a for k, v in env.items() for a in ("--env", f"{k}={v}")],
        ]
        with detached(containerd, ref, *args) as cid:
            started = "Kafka Server started"
            wait_for(started, lambda: log.is_file() and started in log.read_text(), 120, log)
            code, text = _exec(
                containerd, cid, "bash", "-c", "</dev/tcp/127.0.0.1/9092 && id -u", prints=True
            )
            assert (code, text.strip()) == (0, "1000"), text
            written = (vol / "config" / "server.properties").read_text()
            assert "num.partitions=3" in written
            assert "log.dirs=/var/lib/kafka/data" in written
            assert (vol / "data" / "meta.properties").is_file()
            stops_on_sigterm(containerd, cid, timeout_s=60)


def _bind(src: Path, dst: str) -> list[str]:
    return ["--mount", f"type=bind,src={src},dst={dst},options=rbind:rw"]


def _exec(ctd: PrivateContainerd, cid: str, *cmd: str, prints: bool = False) -> tuple[int, str]:
    """Run ``cmd`` in the container. ``ctr tasks exec`` can lose the output of a process
    that exits before it attaches to its FIFOs (seen once in CI under load): a command
    that ``prints`` and came back empty but successful is run again, at most twice more."""
    for _ in range(3):
        out = ctd.ctr("tasks", "exec", "--exec-id", f"x{uuid.uuid4().hex[:8]}", cid, *cmd)
        text = out.stdout + out.stderr
        if not (prints and out.returncode == 0 and not text.strip()):
            break
    return out.returncode, text
