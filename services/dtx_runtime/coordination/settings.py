"""The settings both coordinating services read: the 2PC coordinator and the saga orchestrator.

The policy itself comes from ``DTX_POLICY_FILE``. ``DTX_PARTICIPANTS`` is
``name=host:port,...``: defaults the policy may override. ``DTX_REPLICA_ID``
names this replica in leases (the pod name in a cluster); a restarted process
with the same id takes its predecessor's leases at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from dtx_runtime.settings import ServiceSettings


class CoordinationSettings(ServiceSettings):
    """A coordinating service's settings (see the module docstring)."""

    policy_file: Path | None = None
    participants: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    replica_id: str = Field(
        default_factory=lambda: os.environ.get("HOSTNAME") or socket.gethostname()
    )
    # The pool of the writes a crash may lose (synchronous_commit=off): see each log's storage.
    lazy_pool_max: int = Field(default=20, ge=1, le=500)

    @field_validator("participants", mode="before")
    @classmethod
    def _parse_pairs(cls, value: object) -> object:
        if isinstance(value, str):
            pairs: dict[str, str] = {}
            for item in filter(None, (p.strip() for p in value.split(","))):
                name, sep, endpoint = item.partition("=")
                if not sep or ":" not in endpoint:
                    raise ValueError(f"{item!r} is not name=host:port")
                pairs[name.strip()] = endpoint.strip()
            return pairs
        return value
