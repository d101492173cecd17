"""Orchestrator settings (environment) — the policy itself comes from DTX_POLICY_FILE.

The coordination settings (shared with the 2PC coordinator), under the
orchestrator's own defaults:

``DTX_POLICY_FILE``    the TransactionPolicy file (JSON or YAML), watched for changes.
``DTX_PARTICIPANTS``   ``name=host:port,...`` — endpoints the policy may override.
``DTX_REPLICA_ID``     this replica's name in leases (the pod name in a cluster); a
                       restarted process with the same id takes its predecessor's
                       leases at once.
``DTX_SERVICE_NAME`` / ``DTX_GRPC_PORT`` / ``DTX_HTTP_PORT`` default to saga / 50061 / 9471
(``DTX_SAGA_ENDPOINT`` of orders points at 50061).
"""

from __future__ import annotations

from pydantic import Field

from dtx_runtime.coordination.settings import CoordinationSettings
from dtx_runtime.settings import Port


class SagaSettings(CoordinationSettings):
    service_name: str = Field(default="saga", min_length=1, max_length=63)
    grpc_port: Port = 50061
    http_port: Port = 9471
