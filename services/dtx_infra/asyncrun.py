"""Run a coroutine to completion from synchronous code, whatever loop the caller runs.

``LocalInfra`` is a synchronous API (a CLI and pytest fixtures call it), but its probes use
asyncpg and aiokafka. ``asyncio.run`` fails inside a running loop (an async test, a service),
so each probe gets a fresh loop on a short-lived thread, with a hard deadline on the join.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dtx_infra.errors import InfraError

T = TypeVar("T")


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]], timeout_s: float, what: str) -> T:
    """Run ``factory()`` on a private event loop; raise InfraError after ``timeout_s``."""
    result: list[T] = []
    failure: list[BaseException] = []

    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout_s)

    def target() -> None:
        try:
            result.append(asyncio.run(bounded()))
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"dtx-infra-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s + 10)
    if thread.is_alive():
        raise InfraError(f"{what} hung for more than {timeout_s + 10:.0f}s")
    if failure:
        exc = failure[0]
        if isinstance(exc, TimeoutError):
            raise InfraError(f"{what} timed out after {timeout_s:.0f}s") from exc
        raise exc
    return result[0]
