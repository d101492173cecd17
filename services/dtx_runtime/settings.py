"""Service settings from environment variables, validated at start-up.

The variable names are the ones the Helm chart sets (``DTX_*`` plus the
standard ``OTEL_*``), so a pod and a local process configure a service the same
way. A bad value stops the service with a message that names the variable,
instead of failing later on the first request that needs it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dtx_runtime.errors import ConfigError

Port = Annotated[int, Field(ge=1, le=65535)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ServiceSettings(BaseSettings):
    """What every service reads. Services subclass it to add their own."""

    model_config = SettingsConfigDict(env_prefix="DTX_", extra="ignore", frozen=True)

    service_name: str = Field(default="dtx", min_length=1, max_length=63)
    bind_host: str = "0.0.0.0"
    grpc_port: Port = 50051
    http_port: Port = 9464
    database_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    db_pool_min: int = Field(default=2, ge=1, le=100)
    db_pool_max: int = Field(default=20, ge=1, le=500)
    db_connect_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    kafka_bootstrap: str | None = Field(default=None, pattern=r"^[^\s,]+:\d+(,[^\s,]+:\d+)*$")
    log_level: LogLevel = "INFO"
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "DTX_OTLP_ENDPOINT"),
    )


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

_PASSWORD = re.compile(r"(?P<user>//[^/@:\s]*):[^/\s]*@")


def _redact(value: object) -> object:
    """Mask the password of a URL-like value (``//user:secret@`` -> ``//user:***@``)."""
    return _PASSWORD.sub(r"\g<user>:***@", value) if isinstance(value, str) else value


def _env_name(settings_type: type[ServiceSettings], field: str) -> str:
    info = settings_type.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def describe_validation_error(settings_type: type[ServiceSettings], exc: ValidationError) -> str:
    """One line per bad variable: ``DTX_GRPC_PORT='abc': Input should be a valid integer``."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "?"
        name = _env_name(settings_type, str(error["loc"][0])) if error["loc"] else field
        value = _redact(error.get("input"))
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        parts.append(f"{name}{shown}: {error['msg']}")
    return "invalid settings: " + "; ".join(parts)


def load_settings(settings_type: type[SettingsT], **overrides: object) -> SettingsT:
    """Read and validate settings, turning pydantic's report into a :class:`ConfigError`."""
    try:
        return settings_type(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(settings_type, exc)) from None
