"""The REST gateway: JSON over HTTP with JWT bearer auth in front of the gRPC services.

``dtx serve gateway`` runs it as a dtx service (gRPC health, side port with
``/metrics``) that also serves the public REST API on ``DTX_GATEWAY_PORT``.
"""
