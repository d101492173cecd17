"""A bounded, inter-process file lock.

``up``/``down`` may be called concurrently by several test processes or a developer's shell;
serialising them on a lock file in the state dir makes the "already running" checks reliable.
The wait is bounded so that a stuck holder yields an error instead of a hang.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dtx_infra.errors import InfraError


@contextmanager
def file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block; give up after ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise InfraError(
                        f"{what}: another process held {path} for more than {timeout_s:.0f}s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
