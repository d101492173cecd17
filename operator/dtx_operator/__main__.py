"""``python -m dtx_operator``: the operator, standalone (one replica, no peering objects).

Environment:

- ``DTX_OPERATOR_NAMESPACE``: serve only this namespace (a Role suffices); unset, all
  namespaces (needs the ClusterRole).
- ``DTX_OPERATOR_LIVENESS``: the liveness endpoint, default ``http://0.0.0.0:8080/healthz``.
- ``DTX_OPERATOR_VERBOSE=1``: debug logs, including every timer round.

Credentials: the pod's service account, else ``KUBECONFIG`` (or ``~/.kube/config``).
"""

from __future__ import annotations

import logging
import os
import re

import kopf

import dtx_operator.handlers  # noqa: F401  (registers the handlers with kopf)

_TIMER_SUCCESS = re.compile(r"^Timer '[^']*' succeeded\.$")


class _QuietTimers(logging.Filter):
    """Drop kopf's "Timer ... succeeded." line: one per policy every few seconds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TIMER_SUCCESS.match(record.getMessage())


def main() -> None:
    namespace = os.environ.get("DTX_OPERATOR_NAMESPACE", "").strip()
    liveness = os.environ.get("DTX_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz")
    verbose = os.environ.get("DTX_OPERATOR_VERBOSE") == "1"
    kopf.configure(verbose=verbose)
    if not verbose:
        logging.getLogger("kopf.objects").addFilter(_QuietTimers())
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the liveness probes
    kopf.run(
        standalone=True,
        liveness_endpoint=liveness,
        clusterwide=not namespace,
        namespaces=[namespace] if namespace else (),
    )


if __name__ == "__main__":
    main()
