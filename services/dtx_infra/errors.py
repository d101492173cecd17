"""The one exception type of dtx_infra.

Why a single type with a separate ``details`` field: the CLI must end every failure with ONE
clear line on stderr, yet a readiness timeout is only debuggable with the server log's last
lines. ``summary`` is that one line; ``details`` (optional, multi-line) is printed before it.
``str(err)`` joins both so that Python callers and pytest reports see everything.
"""

from __future__ import annotations


class InfraError(RuntimeError):
    """Starting, stopping or inspecting local infrastructure failed; the summary names what."""

    def __init__(self, summary: str, details: str | None = None) -> None:
        self.summary = " ".join(summary.split())  # guarantee a single line
        self.details = details.rstrip("\n") if details else None
        super().__init__(self.summary if not self.details else f"{self.summary}\n{self.details}")
