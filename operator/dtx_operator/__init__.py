"""The dtx operator: TransactionPolicy custom resources to the coordinators' policy file.

``mapping`` is the pure part (spec to file, ConfigMap, hash, status conditions);
``kubeapi`` the few API calls beyond kopf's own (kubernetes_asyncio); ``handlers`` are
thin kopf handlers around them; ``python -m dtx_operator`` runs them.
"""

GROUP = "dtx.dev"
VERSION = "v1alpha1"
PLURAL = "transactionpolicies"
KIND = "TransactionPolicy"
