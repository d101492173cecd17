"""Records both drivers keep: attempts at a branch, interventions, lease owners."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from dtx.v1 import transactions_pb2
from dtx_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Attempt:
    """One failed or retried call to a branch, kept for people looking at a stuck transaction."""

    gid: str
    branch: str
    action: str
    attempt: int
    result: str
    detail: str
    at: datetime | None = None


def check_actor(request: transactions_pb2.InterveneRequest) -> None:
    """A manual intervention names who and why: both go to the audit log."""
    if not request.actor.strip():
        raise InvalidArgument("actor: who intervenes must be named (it goes to the audit log)")
    if not request.reason.strip():
        raise InvalidArgument("reason: an intervention needs a reason (it goes to the audit log)")


def lease_owner(replica_id: str) -> tuple[str, str]:
    """(prefix, owner) of this process's leases: ``<replica>/<incarnation>``.

    The incarnation tells a restarted replica its predecessor's leases apart,
    so it takes them over at once instead of waiting for them to expire.
    """
    prefix = f"{replica_id}/"
    return prefix, f"{prefix}{uuid.uuid4().hex[:8]}"
