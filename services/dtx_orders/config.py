"""Orders settings.

Environment variables (besides those of :class:`ParticipantSettings`, e.g.
``DTX_DATABASE_URL`` and ``DTX_COORDINATOR_ENDPOINT``, the 2PC coordinator):

``DTX_SAGA_ENDPOINT``                   the saga orchestrator, ``host:port`` (default 127.0.0.1:50061).
``DTX_PAYMENTS_ENDPOINT``               payments' gRPC, ``host:port`` (default 127.0.0.1:50052).
``DTX_INVENTORY_ENDPOINT``              inventory's gRPC, ``host:port`` (default 127.0.0.1:50053).
``DTX_TRANSACTION_TIMEOUT_MS``          the timeout of an order's global transaction
                                        (default 5000); the call waits that long plus
                                        ``DTX_TRANSACTION_CALL_MARGIN_SECONDS`` (default 5).
``DTX_LOOKUP_TIMEOUT_SECONDS``          deadline of the calls to payments and inventory and
                                        of the reconciler's lookups (default 3).
``DTX_PRICE_CACHE_SECONDS``             how long a product's price, once asked of inventory, is
                                        used without asking again (default 30; 0: ask on every
                                        order). Inventory checks the price an order was priced
                                        at, so a stale one can only reject an order.
``DTX_ORDER_RECONCILE_AFTER_SECONDS``   a PENDING order older than this is settled by the
                                        reconciler from its transaction's outcome (default 30;
                                        must exceed the transaction's timeout plus margin).
``DTX_ORDER_RECONCILE_INTERVAL_SECONDS`` pause between reconciler passes (default 5).
``DTX_ORDER_RECONCILE_BATCH``           orders read per page by the reconciler (default 100).
``DTX_SERVICE_NAME`` / ``DTX_GRPC_PORT`` / ``DTX_HTTP_PORT`` default to orders / 50054 / 9474.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from dtx_runtime.participant.wiring import ParticipantSettings
from dtx_runtime.settings import Port

_ENDPOINT = r"^[^\s:]+:\d+$"


class OrdersSettings(ParticipantSettings):
    service_name: str = Field(default="orders", min_length=1, max_length=63)
    grpc_port: Port = 50054
    http_port: Port = 9474
    saga_endpoint: str = Field(default="127.0.0.1:50061", pattern=_ENDPOINT)
    payments_endpoint: str = Field(default="127.0.0.1:50052", pattern=_ENDPOINT)
    inventory_endpoint: str = Field(default="127.0.0.1:50053", pattern=_ENDPOINT)
    transaction_timeout_ms: int = Field(default=5000, ge=100, le=600_000)
    transaction_call_margin_seconds: float = Field(default=5.0, ge=0, le=600)
    lookup_timeout_seconds: float = Field(default=3.0, gt=0, le=120)
    price_cache_seconds: float = Field(default=30.0, ge=0, le=86_400)
    order_reconcile_after_seconds: float = Field(default=30.0, gt=0, le=86_400)
    order_reconcile_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    order_reconcile_batch: int = Field(default=100, ge=1, le=10_000)
    allow_uncoordinated: bool = False

    @property
    def transaction_call_seconds(self) -> float:
        """How long PlaceOrder waits for the coordinator or the orchestrator."""
        return self.transaction_timeout_ms / 1000 + self.transaction_call_margin_seconds

    @model_validator(mode="after")
    def _reconcile_after_the_call(self) -> Self:
        # The reconciler's GetOutcome of a gid the coordinator never saw records
        # an abort; it must not race a RunTransaction that is still on its way.
        if self.order_reconcile_after_seconds <= self.transaction_call_seconds:
            raise ValueError(
                "DTX_ORDER_RECONCILE_AFTER_SECONDS must exceed DTX_TRANSACTION_TIMEOUT_MS/1000"
                f" + DTX_TRANSACTION_CALL_MARGIN_SECONDS ({self.transaction_call_seconds:g} s)"
            )
        return self
