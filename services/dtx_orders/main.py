"""Wiring of the orders service: ``dtx serve orders`` runs :data:`SERVICE`."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import (
    coordinator_pb2_grpc,
    inventory_pb2_grpc,
    orders_pb2_grpc,
    participant_pb2_grpc,
    payments_pb2_grpc,
    saga_pb2_grpc,
)
from dtx_orders.config import OrdersSettings
from dtx_orders.handlers import OrdersServicer
from dtx_orders.participant import ConfirmOrderManager
from dtx_orders.placement import Placement, Remotes
from dtx_orders.reconciler import RemoteLookup, run_reconciler
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.channels import Channels
from dtx_runtime.outbox import OUTBOX_MIGRATIONS, wire_outbox
from dtx_runtime.participant import BARRIER_MIGRATIONS
from dtx_runtime.participant.wiring import wire_participant

HERE = Path(__file__).parent


async def setup(ctx: ServiceContext[OrdersSettings]) -> None:
    settings = ctx.settings
    channels = Channels()
    remotes = Remotes(
        payments=payments_pb2_grpc.PaymentsStub(channels.get(settings.payments_endpoint)),
        inventory=inventory_pb2_grpc.InventoryStub(channels.get(settings.inventory_endpoint)),
        coordinator=coordinator_pb2_grpc.CoordinatorStub(
            channels.get(settings.coordinator_endpoint)
        ),
        saga=saga_pb2_grpc.SagaOrchestratorStub(channels.get(settings.saga_endpoint)),
        participants={
            "payments": participant_pb2_grpc.ParticipantStub(
                channels.get(settings.payments_endpoint)
            ),
            "inventory": participant_pb2_grpc.ParticipantStub(
                channels.get(settings.inventory_endpoint)
            ),
        },
    )
    confirmations = ConfirmOrderManager()
    barrier = wire_participant(ctx, confirmations)
    wire_outbox(ctx, barrier)
    placement = Placement(
        ctx.db,
        remotes,
        barrier,
        transaction_timeout_ms=settings.transaction_timeout_ms,
        transaction_call_s=settings.transaction_call_seconds,
        lookup_timeout_s=settings.lookup_timeout_seconds,
        price_cache_s=settings.price_cache_seconds,
        allow_uncoordinated=settings.allow_uncoordinated,
        confirmed=confirmations.confirmed,
    )
    orders_pb2_grpc.add_OrdersServicer_to_server(OrdersServicer(ctx.db, placement), ctx.server)
    pool = ctx.db
    lookup = RemoteLookup(remotes.coordinator, remotes.saga, settings.lookup_timeout_seconds)
    ctx.run_in_background(
        "order-reconciler",
        lambda: run_reconciler(
            pool,
            lookup,
            older_than_s=settings.order_reconcile_after_seconds,
            interval_s=settings.order_reconcile_interval_seconds,
            batch=settings.order_reconcile_batch,
        ),
    )
    ctx.on_shutdown(channels.close)


SERVICE = ServiceDefinition(
    name="orders",
    settings_type=OrdersSettings,
    setup=setup,
    grpc_services=["dtx.v1.Orders", "dtx.v1.Participant"],
    migrations={
        "barrier": BARRIER_MIGRATIONS,
        "outbox": OUTBOX_MIGRATIONS,
        "orders": HERE / "migrations",
    },
)
