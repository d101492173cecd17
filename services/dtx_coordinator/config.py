"""Coordinator settings (environment): the shared coordination settings, as they are.

See :mod:`dtx_runtime.coordination.settings`; the policy itself comes from DTX_POLICY_FILE.
"""

from __future__ import annotations

from dtx_runtime.coordination.settings import CoordinationSettings


class CoordinatorSettings(CoordinationSettings):
    """The 2PC coordinator's settings."""
