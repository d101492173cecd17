"""Payments settings: the common participant settings under payments' own defaults.

Environment variables (besides those of :class:`ParticipantSettings`, e.g.
``DTX_DATABASE_URL``, ``DTX_COORDINATOR_ENDPOINT``):

``DTX_SERVICE_NAME``  defaults to ``payments``.
``DTX_GRPC_PORT``     defaults to 50052 (``DTX_PAYMENTS_ENDPOINT`` of orders points here).
``DTX_HTTP_PORT``     defaults to 9472 (``/metrics``, ``/healthz``, ``/readyz``).
"""

from __future__ import annotations

from pydantic import Field

from dtx_runtime.participant.wiring import ParticipantSettings
from dtx_runtime.settings import Port


class PaymentsSettings(ParticipantSettings):
    """Payments has no settings of its own beyond the participant's."""

    service_name: str = Field(default="payments", min_length=1, max_length=63)
    grpc_port: Port = 50052
    http_port: Port = 9472
