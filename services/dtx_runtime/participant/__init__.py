"""The participant side of dtx: the barrier, the gRPC Participant servicer and the reaper.

A service that takes part in global transactions (payments, inventory,
orders) writes only a :class:`ResourceManager` — its business effect and how
to undo it — and gets the protocol, idempotency and recovery from here.
"""

from pathlib import Path

from dtx_runtime.participant.barrier import Barrier, Vote
from dtx_runtime.participant.manager import InvalidOperation, Refusal, ResourceManager

BARRIER_MIGRATIONS = Path(__file__).parent / "migrations"

__all__ = [
    "BARRIER_MIGRATIONS",
    "Barrier",
    "InvalidOperation",
    "Refusal",
    "ResourceManager",
    "Vote",
]
