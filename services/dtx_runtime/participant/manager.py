"""What a participant service implements: its business effect and its undo."""

from __future__ import annotations

from typing import Protocol

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2


class Refusal(Exception):
    """A business "no": insufficient funds, out of stock. Becomes a vote, not an error.

    Raised by :meth:`ResourceManager.undo`, it refuses a compensation instead
    (the effect is final): the Compensate fails with FAILED_PRECONDITION.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidOperation(ValueError):
    """The operation is malformed or of another participant's kind; names the field."""


class ResourceManager(Protocol):
    """A participant's business logic, run inside the barrier's local transaction."""

    def validate(self, operation: participant_pb2.BranchOperation) -> None:
        """Raise :class:`InvalidOperation` before anything touches the database."""

    async def apply(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        """Do the work; raise :class:`Refusal` for a business no (the caller rolls back)."""

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        """Reverse a committed :meth:`apply` (saga compensation).

        Raise :class:`Refusal` when the effect must not be undone (it is
        final): the barrier rolls back, records nothing, and the Compensate
        is refused with FAILED_PRECONDITION, which a saga takes as definitive
        (it parks for a person instead of retrying).
        """
