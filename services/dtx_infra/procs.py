"""Process helpers: bounded subprocess runs, liveness via /proc, pidfiles, log tails.

Every wait here has a deadline; the servers' own tools (pg_ctl, apt-get, mvn, java) are run
in their own session so that a timeout can kill the whole process group rather than leaving
grandchildren that keep our pipes open (which would make ``communicate`` hang).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.errors import InfraError

TAIL_LINES = 20

# Detached daemons we spawned ourselves, by PID. Keeping the Popen objects alive lets us reap
# them (no zombie lingering until this interpreter exits) and keeps Popen.__del__ from
# warning about a child that is meant to outlive the object.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class RunResult:
    returncode: int
    output: str


def tail_text(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def tail_file(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a (possibly large or missing) log file."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return f"({path} is missing)"
    body = tail_text(data, lines)
    return f"last {lines} lines of {path}:\n{body}" if body else f"({path} is empty)"


def run(
    cmd: Sequence[str],
    *,
    what: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> RunResult:
    """Run ``cmd`` with stdout+stderr captured, killing its whole group after ``timeout_s``.

    ``what`` is a short phrase ("initdb", "apt-get install postgresql") used in errors.
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise InfraError(f"{what}: command not found: {cmd[0]}") from None
    except PermissionError:
        raise InfraError(f"{what}: permission denied running {cmd[0]}") from None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        partial = b""
        with contextlib.suppress(subprocess.TimeoutExpired):
            partial, _ = proc.communicate(timeout=5)
        _close_pipes(proc)
        raise InfraError(
            f"{what} did not finish within {timeout_s:.0f}s",
            tail_text(partial.decode("utf-8", errors="replace")) or None,
        ) from None
    text = out.decode("utf-8", errors="replace")
    if check and proc.returncode != 0:
        raise InfraError(f"{what} failed with exit code {proc.returncode}", tail_text(text))
    return RunResult(proc.returncode, text)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def spawn_detached(cmd: Sequence[str], *, log: Path, cwd: Path) -> int:
    """Start a long-running server in its own session with output appended to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    _SPAWNED[proc.pid] = proc
    return proc.pid


def _reap(pid: int) -> None:
    proc = _SPAWNED.get(pid)
    if proc is not None and proc.poll() is not None:
        del _SPAWNED[pid]


def exit_code(pid: int) -> int | None:
    """Exit status of a daemon spawned by this interpreter, None if running or unknown."""
    proc = _SPAWNED.get(pid)
    return None if proc is None else proc.poll()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has already stopped serving)."""
    if pid <= 0:
        return False
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # exists but unreadable
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


def find_pids(predicate: Callable[[int], bool]) -> list[int]:
    """All live PIDs (other than ours) for which ``predicate`` holds."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if predicate(pid) and pid_alive(pid):
                found.append(pid)
    return found


def proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def signal_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def terminate(pids: Sequence[int], grace_s: float, what: str) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; raise if anything survives that."""
    signal_pids(pids, signal.SIGTERM)
    alive = wait_gone(pids, grace_s)
    if alive:
        signal_pids(alive, signal.SIGKILL)
        alive = wait_gone(alive, 10)
    if alive:
        raise InfraError(f"{what}: processes {alive} survived SIGKILL")


def read_pidfile(path: Path) -> int | None:
    """The PID on the first line of ``path``, None when missing or malformed."""
    try:
        first = path.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


def write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def rotate_log(path: Path, max_bytes: int = 20 * 1024 * 1024) -> None:
    """Keep one previous generation so that logs of frequent restarts stay bounded."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > max_bytes:
            path.replace(path.with_name(path.name + ".1"))
