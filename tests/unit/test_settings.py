"""Service settings from the environment: defaults, overrides, and one-line errors naming the variable."""

from __future__ import annotations

import os

import pytest

from dtx_runtime import ConfigError, ServiceSettings, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DTX_* or OTEL_* variable of the developer's shell (or of other tests) leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(("DTX_", "OTEL_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings(ServiceSettings)
    assert settings.service_name == "dtx"
    assert settings.bind_host == "0.0.0.0"
    assert settings.grpc_port == 50051
    assert settings.http_port == 9464
    assert settings.database_url is None
    assert settings.kafka_bootstrap is None
    assert settings.log_level == "INFO"
    assert settings.db_pool_min == 2
    assert settings.db_pool_max == 20
    assert settings.db_connect_timeout_seconds == 30.0
    assert settings.shutdown_grace_seconds == 10.0
    assert settings.otlp_endpoint is None


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_GRPC_PORT", "6000")
    monkeypatch.setenv("DTX_HTTP_PORT", "6001")
    monkeypatch.setenv("DTX_SERVICE_NAME", "payments")
    monkeypatch.setenv("DTX_DATABASE_URL", "postgresql://dtx@127.0.0.1:5432/payments")
    monkeypatch.setenv("DTX_KAFKA_BOOTSTRAP", "127.0.0.1:9092,kafka-1:9092")
    monkeypatch.setenv("DTX_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("DTX_SHUTDOWN_GRACE_SECONDS", "2.5")

    settings = load_settings(ServiceSettings)

    assert settings.grpc_port == 6000
    assert isinstance(settings.grpc_port, int)
    assert settings.http_port == 6001
    assert settings.service_name == "payments"
    assert settings.database_url == "postgresql://dtx@127.0.0.1:5432/payments"
    assert settings.kafka_bootstrap == "127.0.0.1:9092,kafka-1:9092"
    assert settings.log_level == "DEBUG"
    assert settings.shutdown_grace_seconds == 2.5


def test_keyword_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_GRPC_PORT", "6000")
    assert load_settings(ServiceSettings, grpc_port=7000).grpc_port == 7000


def test_settings_are_frozen() -> None:
    settings = load_settings(ServiceSettings)
    with pytest.raises(ValueError, match="frozen"):
        settings.grpc_port = 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DTX_GRPC_PORT", "abc"),
        ("DTX_GRPC_PORT", "70000"),
        ("DTX_GRPC_PORT", "0"),
        ("DTX_HTTP_PORT", "-1"),
        ("DTX_LOG_LEVEL", "LOUD"),
        ("DTX_DATABASE_URL", "mysql://x"),
        ("DTX_KAFKA_BOOTSTRAP", "kafka without port"),
        ("DTX_DB_POOL_MIN", "0"),
        ("DTX_SHUTDOWN_GRACE_SECONDS", "soon"),
        ("DTX_SERVICE_NAME", ""),
    ],
)
def test_malformed_value_names_the_variable_on_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as caught:
        load_settings(ServiceSettings)

    message = str(caught.value)
    assert variable in message
    assert "\n" not in message
    assert message.startswith("invalid settings: ")
    # pydantic's own multi-line report (with its URL) is not what a person sees
    assert "errors.pydantic.dev" not in message
    # the exception is raised "from None": no chained ValidationError in the traceback
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_GRPC_PORT", "abc")
    monkeypatch.setenv("DTX_LOG_LEVEL", "LOUD")
    monkeypatch.setenv("DTX_HTTP_PORT", "8080")  # a good one is not reported

    with pytest.raises(ConfigError) as caught:
        load_settings(ServiceSettings)

    message = str(caught.value)
    assert "DTX_GRPC_PORT='abc'" in message
    assert "DTX_LOG_LEVEL='LOUD'" in message
    assert "DTX_HTTP_PORT" not in message
    assert "\n" not in message


def test_otel_endpoint_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317")
    assert load_settings(ServiceSettings).otlp_endpoint == "http://otel-collector:4317"


def test_dtx_otlp_endpoint_is_an_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_OTLP_ENDPOINT", "http://localhost:4317")
    assert load_settings(ServiceSettings).otlp_endpoint == "http://localhost:4317"


def test_service_subclass_adds_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    class PaymentsSettings(ServiceSettings):
        max_balance_minor: int = 1_000

    monkeypatch.setenv("DTX_MAX_BALANCE_MINOR", "5000")
    assert load_settings(PaymentsSettings).max_balance_minor == 5000

    monkeypatch.setenv("DTX_MAX_BALANCE_MINOR", "lots")
    with pytest.raises(ConfigError, match="DTX_MAX_BALANCE_MINOR"):
        load_settings(PaymentsSettings)


@pytest.mark.parametrize(
    "url",
    [
        "postgres//dtx:s3cret@db:5432/payments",  # a typo in the scheme
        "mysql://dtx:s3cret@db/payments",
        "mysql://dtx:s3c@ret@db/payments",  # '@' inside the password
    ],
)
def test_a_refused_database_url_does_not_print_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("DTX_DATABASE_URL", url)

    with pytest.raises(ConfigError) as caught:
        load_settings(ServiceSettings)

    message = str(caught.value)
    assert "DTX_DATABASE_URL" in message
    assert "s3c" not in message
    assert "ret@" not in message
    assert "dtx:***@db" in message  # still shows where it points
