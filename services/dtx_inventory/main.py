"""Wiring of the inventory service: ``dtx serve inventory`` runs :data:`SERVICE`."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import inventory_pb2_grpc
from dtx_inventory.config import InventorySettings
from dtx_inventory.handlers import InventoryServicer
from dtx_inventory.participant import ReserveManager
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.outbox import OUTBOX_MIGRATIONS, wire_outbox
from dtx_runtime.participant import BARRIER_MIGRATIONS
from dtx_runtime.participant.wiring import wire_participant

HERE = Path(__file__).parent


async def setup(ctx: ServiceContext[InventorySettings]) -> None:
    inventory_pb2_grpc.add_InventoryServicer_to_server(
        InventoryServicer(ctx.db, ctx.settings.currency), ctx.server
    )
    barrier = wire_participant(ctx, ReserveManager())
    wire_outbox(ctx, barrier)


SERVICE = ServiceDefinition(
    name="inventory",
    settings_type=InventorySettings,
    setup=setup,
    grpc_services=["dtx.v1.Inventory", "dtx.v1.Participant"],
    migrations={
        "barrier": BARRIER_MIGRATIONS,
        "outbox": OUTBOX_MIGRATIONS,
        "inventory": HERE / "migrations",
    },
)
