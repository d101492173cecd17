"""Outgoing gRPC channels: one per endpoint, reused for every call.

Setting up a channel costs a TCP and HTTP/2 handshake; a channel per call
would dominate a two-phase commit's latency. The OpenTelemetry client
interceptors go on every channel so one global transaction is one trace.
"""

from __future__ import annotations

import grpc

from dtx_runtime import telemetry

_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # dtx retries on purpose, with its own bounds
    # gRPC's default reconnect backoff grows to 120 s: a participant that
    # restarted would be failed fast for minutes, eating every bounded retry.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class Channels:
    """A small registry of channels keyed by ``host:port``; close them all on shutdown."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                endpoint, options=_OPTIONS, interceptors=telemetry.client_interceptors()
            )
            self._channels[endpoint] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=1.0)
        self._channels.clear()
