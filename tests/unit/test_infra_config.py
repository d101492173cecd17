"""dtx_infra without servers: rendered configs, port checks, Java detection, bounded runs."""

from __future__ import annotations

import base64
import socket
import stat
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dtx_infra import InfraError, kafka_jars, pg_binaries
from dtx_infra.java import parse_java_major, require_java
from dtx_infra.kafka_config import (
    KafkaParams,
    new_cluster_id,
    render_log4j_properties,
    render_server_properties,
)
from dtx_infra.local import Endpoints
from dtx_infra.pg_config import (
    INCLUDE_LINE,
    PgParams,
    ensure_include,
    render_pg_conf,
    socket_dir_setting,
)
from dtx_infra.ports import (
    PICKABLE_PORTS,
    ensure_port_free,
    free_ports,
    pickable_ports,
    port_is_free,
)
from dtx_infra.procs import run, tail_file
from dtx_infra.settings import InfraSettings, parse_port

pytestmark = pytest.mark.unit


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key: value for key, value in pairs}


# -- Kafka -------------------------------------------------------------------------------------


def test_server_properties_single_node_kraft() -> None:
    props = _properties(render_server_properties(KafkaParams(59092, 59093, Path("/s/kafka/data"))))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:59093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:59092,CONTROLLER://127.0.0.1:59093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:59092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == "/s/kafka/data"
    assert props["num.partitions"] == "3"
    assert props["auto.create.topics.enable"] == "true"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    # A single node cannot host the default replication factor 3 of the internal topics.
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"


def test_server_properties_follow_ports_and_escape_paths() -> None:
    text = render_server_properties(KafkaParams(41000, 41001, Path(r"/tmp/we\ird")))
    props = _properties(text)
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:41000"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:41001"
    assert props["log.dirs"] == r"/tmp/we\\ird"
    with pytest.raises(ValueError, match="single line"):
        render_server_properties(KafkaParams(1, 2, Path("/a\nb")))


def test_log4j_logs_to_stdout() -> None:
    props = _properties(render_log4j_properties())
    assert props["log4j.rootLogger"] == "INFO, stdout"
    assert props["log4j.appender.stdout"] == "org.apache.log4j.ConsoleAppender"


def test_cluster_id_is_kafka_uuid_format() -> None:
    cid = new_cluster_id()
    assert len(cid) == 22
    assert "=" not in cid
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16
    assert cid != new_cluster_id()


def test_pom_pins_the_version_the_code_expects() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(kafka_jars.POM).getroot()
    version = root.find("m:properties/m:kafka.version", ns)
    assert version is not None
    assert version.text == kafka_jars.KAFKA_VERSION == "3.9.1"
    artifacts = {a.text for a in root.iterfind("m:dependencies/m:dependency/m:artifactId", ns)}
    assert {"kafka_2.13", "slf4j-reload4j", "reload4j"} <= artifacts


def test_jar_cache_needs_matching_stamp(tmp_path: Path) -> None:
    assert not kafka_jars.jars_are_cached(tmp_path)
    libs = kafka_jars.libs_dir(tmp_path)
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-3.9.1.jar").write_bytes(b"")
    stamp = kafka_jars.kafka_home(tmp_path) / "libs.stamp"
    stamp.write_text("stale\n")
    assert not kafka_jars.jars_are_cached(tmp_path)
    stamp.write_text(kafka_jars._pom_digest(kafka_jars.POM) + "\n")
    assert kafka_jars.jars_are_cached(tmp_path)
    assert kafka_jars.ensure_kafka_jars(tmp_path) == libs  # no Maven run when cached


# -- PostgreSQL --------------------------------------------------------------------------------


def test_pg_conf_has_the_settings_2pc_needs() -> None:
    conf = render_pg_conf(PgParams(55432, Path("/s/postgres/run")))
    settings = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=", 1) for line in conf.splitlines() if not line.startswith("#"))
    )
    assert settings["listen_addresses"] == "'127.0.0.1'"
    assert settings["port"] == "55432"
    assert settings["unix_socket_directories"] == "'/s/postgres/run'"
    assert settings["max_prepared_transactions"] == "256"
    assert settings["max_connections"] == "300"
    assert settings["shared_buffers"] == "128MB"
    assert settings["fsync"] == "on"
    assert settings["synchronous_commit"] == "on"


def test_socket_dir_dropped_when_path_too_long() -> None:
    assert socket_dir_setting(Path("/short"), 55432) == "/short"
    assert socket_dir_setting(Path("/" + "x" * 120), 55432) == ""


def test_include_is_appended_once(tmp_path: Path) -> None:
    conf = tmp_path / "postgresql.conf"
    conf.write_text("max_connections = 100\n")
    ensure_include(conf)
    ensure_include(conf)
    assert conf.read_text().count(INCLUDE_LINE) == 1
    assert conf.read_text().startswith("max_connections = 100\n")


def _fake_pg(root: Path, version: str, tools: tuple[str, ...]) -> None:
    bin_dir = root / version / "bin"
    bin_dir.mkdir(parents=True)
    for tool in tools:
        path = bin_dir / tool
        path.write_text("#!/bin/sh\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_newest_complete_pg_version_wins(tmp_path: Path) -> None:
    _fake_pg(tmp_path, "9.6", ("initdb", "pg_ctl", "postgres"))
    _fake_pg(tmp_path, "15", ("initdb", "pg_ctl", "postgres"))
    _fake_pg(tmp_path, "16", ("psql",))  # client-only: not a server install
    found = pg_binaries.find_pg_binaries(tmp_path)
    assert found is not None
    assert found.version == "15"
    assert found.tool("pg_ctl") == str(tmp_path / "15" / "bin" / "pg_ctl")
    assert pg_binaries.find_pg_binaries(tmp_path / "missing") is None


def test_missing_pg_without_apt_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_binaries, "find_pg_binaries", lambda root=None: None)
    monkeypatch.setattr("dtx_infra.pg_binaries.shutil.which", lambda name: None)
    with pytest.raises(InfraError, match="install the Debian package postgresql") as info:
        pg_binaries.ensure_pg_binaries()
    assert "\n" not in info.value.summary


# -- ports and settings ------------------------------------------------------------------------


def test_taken_port_is_reported_with_its_number_and_variable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(InfraError) as info:
            ensure_port_free(port, "DTX_PG_PORT")
    assert str(info.value) == f"port {port} is taken by another process; set DTX_PG_PORT"
    assert port_is_free(port)
    ensure_port_free(port, "DTX_PG_PORT")


def test_port_range_narrows_what_free_ports_hands_out(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pickable_ports("") == PICKABLE_PORTS
    monkeypatch.setenv("DTX_PORT_RANGE", "24000-24099")
    assert pickable_ports() == range(24000, 24100)
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(24000 <= p <= 24099 for p in ports)


@pytest.mark.parametrize("raw", ["24000", "a-b", "24000-24001", "100-200", "30000-40000"])
def test_bad_port_range_names_the_variable(raw: str) -> None:
    with pytest.raises(InfraError, match="DTX_PORT_RANGE"):
        pickable_ports(raw)


@pytest.mark.parametrize("raw", ["abc", "0", "65536", "-1", "12.5", ""])
def test_bad_port_values_name_the_variable(raw: str) -> None:
    with pytest.raises(InfraError, match="DTX_PG_PORT"):
        parse_port("DTX_PG_PORT", raw)


def test_settings_from_environment(tmp_path: Path) -> None:
    env = {"DTX_STATE_DIR": str(tmp_path / "s"), "DTX_PG_PORT": "41432", "DTX_KAFKA_PORT": "41092"}
    s = InfraSettings.resolve(env=env)
    assert s.state_dir == tmp_path / "s"
    assert (s.pg_port, s.kafka_port, s.kafka_controller_port) == (41432, 41092, 41093)
    explicit = InfraSettings.resolve(tmp_path / "x", pg_port=1111, env=env)
    assert explicit.state_dir == tmp_path / "x"
    assert explicit.pg_port == 1111
    defaults = InfraSettings.resolve(env={})
    assert (defaults.pg_port, defaults.kafka_port, defaults.kafka_controller_port) == (
        55432,
        59092,
        59093,
    )
    assert defaults.state_dir.name == ".dtx"
    with pytest.raises(InfraError, match="three different ports"):
        InfraSettings.resolve(env={"DTX_PG_PORT": "59092"})


def test_endpoints_dsn() -> None:
    eps = Endpoints("127.0.0.1", 55432, "dtx", "127.0.0.1:59092")
    assert eps.dsn("payments") == "postgresql://dtx@127.0.0.1:55432/payments"
    assert set(eps.service_dsns()) == {
        "payments",
        "inventory",
        "orders",
        "coordinator",
        "saga",
        "notifications",
    }


# -- Java --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('openjdk version "22-ea" 2024-03-19', 22),
        ('java version "1.8.0_392"\nJava(TM) SE Runtime Environment', 8),
        ('openjdk version "11.0.2" 2019-01-15', 11),
        ('Picked up JAVA_TOOL_OPTIONS: -Xss1m\nopenjdk version "17.0.1"', 17),
        ("no version here", None),
    ],
)
def test_java_version_parsing(output: str, major: int | None) -> None:
    assert parse_java_major(output) == major


def _fake_java(home: Path, version: str) -> None:
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2019-01-15' >&2\n")
    java.chmod(0o755)


def test_old_java_is_rejected_naming_17(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_java(tmp_path / "jdk11", "11.0.2")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk11"))
    with pytest.raises(InfraError, match=r"Java 17 or newer is required.*Java 11"):
        require_java()


def test_new_java_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_java(tmp_path / "jdk21", "21.0.1")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk21"))
    assert require_java() == tmp_path / "jdk21" / "bin" / "java"


def test_missing_java_names_17(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InfraError, match="Java 17"):
        require_java()


# -- bounded subprocesses ----------------------------------------------------------------------


def test_run_kills_the_whole_group_on_timeout() -> None:
    """A grandchild holding our pipe must not turn a timeout into a hang."""
    started = time.monotonic()
    with pytest.raises(InfraError, match="did not finish within"):
        run(["sh", "-c", "sleep 30 & sleep 30"], what="sleepers", timeout_s=0.5)
    assert time.monotonic() - started < 10


def test_run_failure_carries_output_tail() -> None:
    with pytest.raises(InfraError) as info:
        run(["sh", "-c", "echo boom; exit 3"], what="boomer", timeout_s=10)
    assert info.value.summary == "boomer failed with exit code 3"
    assert info.value.details == "boom"


def test_run_missing_binary_is_named() -> None:
    with pytest.raises(InfraError, match="command not found: /nonexistent/tool"):
        run(["/nonexistent/tool"], what="tool", timeout_s=5)


def test_tail_file_keeps_last_twenty_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    lines = tail_file(log).splitlines()
    assert lines[0] == f"last 20 lines of {log}:"
    assert lines[1:] == [f"line {i}" for i in range(80, 100)]
    assert "missing" in tail_file(tmp_path / "nope.log")


def test_infra_error_summary_is_one_line() -> None:
    err = InfraError("a\nb  c", "detail 1\ndetail 2\n")
    assert err.summary == "a b c"
    assert str(err) == "a b c\ndetail 1\ndetail 2"
