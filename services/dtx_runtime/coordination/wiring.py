"""What a coordinating service (the 2PC coordinator, the saga orchestrator) is wired with.

Both keep a log in their own database, written through two pools — the
service's own (durable) and a lazy one (``synchronous_commit=off``) for the
writes a crash may lose — read one policy file that they watch, resolve
participants through it, and run leader-less recovery under a lease owner
named after the replica. Only the engine and its gRPC servicer differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg

from dtx_runtime.coordination.records import lease_owner
from dtx_runtime.coordination.recovery import Driver, run_recovery
from dtx_runtime.coordination.settings import CoordinationSettings
from dtx_runtime.database import create_pool
from dtx_runtime.policy import PolicyHolder
from dtx_runtime.service import ServiceContext

S = TypeVar("S", bound=CoordinationSettings)


class Engine(Driver[Any], Protocol):
    """A 2PC or saga engine: what recovery drives, closed at shutdown."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Coordination:
    """The shared parts of a coordinating service, made by :func:`wire_coordination`."""

    lazy: asyncpg.Pool
    policy: PolicyHolder
    participants: dict[str, str]
    replica_prefix: str
    owner: str

    def endpoint(self, name: str) -> str | None:
        """A participant's endpoint: the policy's, else the settings' default."""
        return self.policy.current.endpoint_of(name) or self.participants.get(name)

    def known(self) -> set[str]:
        """Every participant a branch or step may name."""
        return {p.name for p in self.policy.current.participants} | set(self.participants)


async def wire_coordination(ctx: ServiceContext[S]) -> Coordination:
    """The lazy pool, the watched policy and the lease owner of a coordinating service."""
    settings = ctx.settings
    assert settings.database_url is not None
    lazy = await create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.lazy_pool_max,
        connect_timeout_s=settings.db_connect_timeout_seconds,
        server_settings={"synchronous_commit": "off"},
    )
    policy = PolicyHolder(settings.policy_file)
    ctx.run_in_background("policy-watch", policy.watch)
    replica_prefix, owner = lease_owner(settings.replica_id)
    return Coordination(lazy, policy, dict(settings.participants), replica_prefix, owner)


def run_engine(
    ctx: ServiceContext[S], coordination: Coordination, engine: Engine, *, protocol: str
) -> None:
    """Recover in the background; at shutdown close the engine, then the lazy pool."""
    ctx.run_in_background(
        "recovery",
        lambda: run_recovery(engine, protocol=protocol, replica_prefix=coordination.replica_prefix),
    )

    async def close() -> None:
        await engine.close()
        await coordination.lazy.close()

    ctx.on_shutdown(close)
