"""Readiness: named checks evaluated with a timeout, and the service's health state.

Kept free of I/O frameworks so the state logic is unit-tested on its own; the
HTTP side port and the gRPC health service both read from here, so the
Kubernetes probe and ``/readyz`` never disagree.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Check = Callable[[], Awaitable[None]]
"""A readiness check raises (anything) when its dependency is not usable."""


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True)
class ReadinessReport:
    phase: Phase
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Ready only while serving and every dependency answered."""
        return self.phase is Phase.SERVING and not self.failures

    def as_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "phase": self.phase.value, "failures": self.failures}


class Health:
    """The phase of the service plus its dependency checks."""

    def __init__(self, check_timeout_s: float = 2.0) -> None:
        self.phase = Phase.STARTING
        self._checks: dict[str, Check] = {}
        self._timeout = check_timeout_s

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    async def evaluate(self) -> ReadinessReport:
        """Run every check concurrently; a check slower than the timeout fails."""
        names = list(self._checks)
        results = await asyncio.gather(
            *(self._run(self._checks[n]) for n in names), return_exceptions=False
        )
        failures = {n: r for n, r in zip(names, results, strict=True) if r is not None}
        return ReadinessReport(self.phase, failures)

    async def _run(self, check: Check) -> str | None:
        try:
            await asyncio.wait_for(check(), self._timeout)
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None
