"""The participants a driver calls: names resolved to endpoints, one stub per endpoint."""

from __future__ import annotations

from collections.abc import Callable

from dtx.v1 import participant_pb2_grpc
from dtx_runtime.channels import Channels
from dtx_runtime.errors import Unavailable


class Participants:
    """Resolves a participant's name through ``endpoint_of`` (the policy, then the
    settings) at each call, so a policy reload that moves a participant applies
    to the next call; channels and stubs are kept per endpoint."""

    def __init__(self, endpoint_of: Callable[[str], str | None]) -> None:
        self.endpoint_of = endpoint_of
        self._channels = Channels()
        self._stubs: dict[str, participant_pb2_grpc.ParticipantAsyncStub] = {}

    def stub(self, participant: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        endpoint = self.endpoint_of(participant)
        if endpoint is None:
            raise Unavailable(f"no endpoint for participant {participant!r}")
        stub = self._stubs.get(endpoint)
        if stub is None:
            stub = participant_pb2_grpc.ParticipantStub(self._channels.get(endpoint))
            self._stubs[endpoint] = stub
        return stub

    async def close(self) -> None:
        await self._channels.close()
        self._stubs.clear()
