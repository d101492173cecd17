"""Loopback port checks.

A server that cannot bind dies with a message buried in its own log, often after a slow JVM
start; checking first turns that into an immediate, named error.
"""

from __future__ import annotations

import os
import random
import socket
import time

from dtx_infra.errors import InfraError
from dtx_infra.settings import HOST


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a listener could bind ``host:port`` right now.

    SO_REUSEADDR mirrors what PostgreSQL and the JVM set, so a port that only has connections
    in TIME_WAIT (from a server we just stopped) still counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_port_free(port: int, env_var: str, host: str = HOST) -> None:
    """Raise the standard "port taken" error unless ``port`` is bindable."""
    if not port_is_free(port, host):
        raise InfraError(f"port {port} is taken by another process; set {env_var}")


def can_connect(port: int, host: str = HOST, timeout_s: float = 1.0) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_port_free(port: int, timeout_s: float, host: str = HOST) -> bool:
    """Poll until the port is bindable again; False if it still is not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if port_is_free(port, host):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# Below Linux's ephemeral range (32768-60999): a port chosen here and bound a
# moment later by a child process cannot meanwhile become some outgoing
# connection's local port, as a kernel-chosen one (bind to port 0) can.
PICKABLE_PORTS = range(20000, 32768)
PORT_RANGE_ENV = "DTX_PORT_RANGE"


def pickable_ports(raw: str | None = None) -> range:
    """The ports :func:`free_ports` picks from: ``$DTX_PORT_RANGE`` (``low-high``) or 20000-32767.

    Separate processes cannot see each other's hand-outs, so processes that pick
    ports at the same moment (parallel test workers, two ``dtx up``) are given
    disjoint ranges; a range must lie within the default one.
    """
    raw = os.environ.get(PORT_RANGE_ENV) if raw is None else raw
    if not raw:
        return PICKABLE_PORTS
    low, sep, high = raw.partition("-")
    try:
        chosen = range(int(low), int(high) + 1) if sep else range(0)
    except ValueError:
        chosen = range(0)
    if len(chosen) < 16 or chosen.start < PICKABLE_PORTS.start or chosen.stop > PICKABLE_PORTS.stop:
        raise InfraError(
            f"{PORT_RANGE_ENV}={raw!r}: expected low-high, at least 16 ports within"
            f" {PICKABLE_PORTS.start}-{PICKABLE_PORTS.stop - 1}"
        )
    return chosen


_rng = random.Random()
# Ports handed out by this process: free when chosen but maybe not bound yet
# (a child starts later), so never handed out twice.
_handed_out: set[int] = set()


def free_ports(count: int = 1, host: str = HOST) -> list[int]:
    """``count`` distinct ports free on ``host`` now, outside the ephemeral range.

    No port is handed out twice by one process: two services chosen ports a
    moment apart must not both get one that neither has bound yet.
    """
    pickable = pickable_ports()
    if len(_handed_out) > len(pickable) // 2:
        _handed_out.clear()  # a very long session: the oldest are long bound or gone
    chosen: list[int] = []
    for _ in range(200 * count):
        if len(chosen) == count:
            _handed_out.update(chosen)
            return chosen
        port = _rng.choice(pickable)
        if port not in chosen and port not in _handed_out and port_is_free(port, host):
            chosen.append(port)
    if len(chosen) == count:
        _handed_out.update(chosen)
        return chosen
    raise InfraError(
        f"no {count} free ports between {pickable.start} and {pickable.stop - 1} on {host}"
    )
