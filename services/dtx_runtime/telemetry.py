"""OpenTelemetry tracing: OTLP export when an endpoint is set, else a true no-op.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the service records spans and the
gRPC, asyncpg and aiokafka instrumentations are installed, so one global
transaction is one trace across every service. Without it nothing is
installed at all: no interceptor, no wrapped query. A deployment traces all
its services or none, and the untraced hot path pays nothing for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_instrumented = False
_enabled = False


def configure_tracing(service: str, otlp_endpoint: str | None) -> None:
    """Install the tracer provider (with an exporter only when configured)."""
    global _provider, _instrumented, _enabled
    if not otlp_endpoint:
        return
    _enabled = True
    if _provider is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
        _provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
        trace.set_tracer_provider(_provider)
        log.info("tracing to %s", otlp_endpoint)
    if not _instrumented:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
        AIOKafkaInstrumentor().instrument()
        _instrumented = True


def server_interceptors() -> Sequence[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The OpenTelemetry server interceptor: one span per incoming RPC."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """Interceptors that carry the trace context on outgoing RPCs."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Flush spans that are still queued, bounded in time."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=int(timeout_s * 1000))
        _provider.shutdown()
