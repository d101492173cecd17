"""Inventory settings.

Environment variables (besides those of :class:`ParticipantSettings`, e.g.
``DTX_DATABASE_URL``, ``DTX_COORDINATOR_ENDPOINT``):

``DTX_CURRENCY``      ISO 4217 code of every price (default ``EUR``). Products
                      keep the currency they were created with.
``DTX_SERVICE_NAME``  defaults to ``inventory``.
``DTX_GRPC_PORT``     defaults to 50053 (``DTX_INVENTORY_ENDPOINT`` of orders points here).
``DTX_HTTP_PORT``     defaults to 9473.
"""

from __future__ import annotations

from pydantic import Field

from dtx_runtime.participant.wiring import ParticipantSettings
from dtx_runtime.settings import Port


class InventorySettings(ParticipantSettings):
    service_name: str = Field(default="inventory", min_length=1, max_length=63)
    grpc_port: Port = 50053
    http_port: Port = 9473
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
