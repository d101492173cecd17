"""Gateway settings (environment).

``DTX_JWT_SECRET``             HS256 secret for bearer tokens; required, at least 32 characters.
``DTX_GATEWAY_PORT``           the REST port (default 8080), bound on ``DTX_BIND_HOST``.
``DTX_<NAME>_ENDPOINT``        ``host:port`` of each backend: ORDERS (default 127.0.0.1:50054),
                               PAYMENTS (50052), INVENTORY (50053), COORDINATOR (50060),
                               SAGA (50061), NOTIFICATIONS (50062).
``DTX_GATEWAY_READY_BACKENDS`` comma-separated backends whose gRPC health must answer
                               SERVING for the gateway to be ready (default
                               ``orders,payments,inventory,coordinator``); the others are
                               reported by ``/readyz`` but do not make it fail.
``DTX_GATEWAY_CALL_TIMEOUT_SECONDS``  deadline of a read or admin call (default 5).
``DTX_GATEWAY_ORDER_TIMEOUT_SECONDS`` deadline of PlaceOrder, which runs a whole
                               global transaction (default 30).
``DTX_GATEWAY_MAX_BODY_BYTES`` larger request bodies are refused with 413 (default 65536).
``DTX_SERVICE_NAME`` / ``DTX_GRPC_PORT`` / ``DTX_HTTP_PORT`` default to gateway / 50065 / 9475.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from dtx_runtime.errors import ConfigError
from dtx_runtime.settings import Port, ServiceSettings

_ENDPOINT = r"^[^\s:]+:\d+$"
MIN_SECRET_CHARS = 32
BACKENDS = ("orders", "payments", "inventory", "coordinator", "saga", "notifications")


def check_secret(secret: str) -> None:
    """Refuse a missing or short HS256 secret; the message never contains the secret."""
    if not secret:
        raise ConfigError(
            f"DTX_JWT_SECRET is required: the HS256 secret for bearer tokens,"
            f" at least {MIN_SECRET_CHARS} characters"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"DTX_JWT_SECRET: at least {MIN_SECRET_CHARS} characters, got {len(secret)}"
        )


class GatewaySettings(ServiceSettings):
    service_name: str = Field(default="gateway", min_length=1, max_length=63)
    grpc_port: Port = 50065
    http_port: Port = 9475
    gateway_port: Port = 8080
    # Checked by :meth:`secret` rather than by a constraint here: a constraint's
    # error would quote the value, and a secret must not reach a log line.
    jwt_secret: SecretStr | None = None
    orders_endpoint: str = Field(default="127.0.0.1:50054", pattern=_ENDPOINT)
    payments_endpoint: str = Field(default="127.0.0.1:50052", pattern=_ENDPOINT)
    inventory_endpoint: str = Field(default="127.0.0.1:50053", pattern=_ENDPOINT)
    coordinator_endpoint: str = Field(default="127.0.0.1:50060", pattern=_ENDPOINT)
    saga_endpoint: str = Field(default="127.0.0.1:50061", pattern=_ENDPOINT)
    notifications_endpoint: str = Field(default="127.0.0.1:50062", pattern=_ENDPOINT)
    gateway_ready_backends: Annotated[tuple[str, ...], NoDecode] = (
        "orders",
        "payments",
        "inventory",
        "coordinator",
    )
    gateway_call_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    gateway_order_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    gateway_max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)

    @field_validator("gateway_ready_backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(filter(None, (p.strip() for p in value.split(","))))
        if isinstance(value, tuple | list):
            unknown = sorted(set(value) - set(BACKENDS))
            if unknown:
                raise ValueError(
                    f"unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})"
                )
        return value

    def secret(self) -> str:
        """The JWT secret, or a :class:`ConfigError` that names the variable (never the value)."""
        value = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
        check_secret(value)
        return value

    def endpoint(self, backend: str) -> str:
        endpoint: str = getattr(self, f"{backend}_endpoint")
        return endpoint
