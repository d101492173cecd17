"""The dtx operator: TransactionPolicy custom resources to the coordinators' policy file.

``mapping`` is the pure part (spec to file, ConfigMap, hash, status conditions);
``handlers`` are thin kopf handlers around it; ``python -m dtx_operator`` runs them.
"""

GROUP = "dtx.dev"
VERSION = "v1alpha1"
PLURAL = "transactionpolicies"
KIND = "TransactionPolicy"
