"""The pure part of the operator: spec to policy file, ConfigMap, hash, and status.

Nothing here talks to Kubernetes or the network, so every rule is unit-tested. The
policy file is the spec itself less ``selector`` (the custom resource's field names are
the file's, see :mod:`dtx_runtime.policy`), as deterministic JSON. It is parsed with
:func:`dtx_runtime.policy.parse_policy` before it is written, and its hash is
:meth:`TransactionPolicy.digest` of that parse: exactly what a coordinator's ``/status``
reports once it runs the file, so operator and coordinators compare like with like.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio.client import V1LabelSelector, V1LabelSelectorRequirement

from dtx_runtime.policy import TransactionPolicy, parse_policy

POLICY_KEY = "policy.json"
MANAGED_BY = "dtx-operator"
POLICY_LABEL = "dtx.dev/policy"
HASH_ANNOTATION = "dtx.dev/policy-hash"
STATUS_PORT_ANNOTATION = "dtx.dev/status-port"
DEFAULT_STATUS_PORT = 9464
# How long coordinators may run another policy than the ConfigMap's before that is
# Degraded rather than a rollout: the kubelet refreshes mounted ConfigMaps within about a
# minute (its sync period plus its cache TTL), and the coordinator polls the file each second.
ROLLOUT_GRACE = datetime.timedelta(seconds=120)
# Pods named in a condition message, at most; the rest are counted.
MAX_NAMED = 5

Json = dict[str, Any]


# -- the policy file ---------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPolicy:
    """The file content, the parsed policy and its hash (= the coordinators' policyHash)."""

    text: str
    policy: TransactionPolicy
    hash: str


def policy_document(spec: Mapping[str, Any]) -> Json:
    """The spec less ``selector``: what the coordinators read (same field names)."""
    return {key: plain(value) for key, value in spec.items() if key != "selector"}


def render_policy(spec: Mapping[str, Any], source: str = "spec") -> RenderedPolicy:
    """The policy file for ``spec``; ConfigError (naming the field) if policy.py refuses it.

    The API server has already checked the spec against the CRD schema, whose bounds and
    rules are policy.py's; parsing again here keeps a skewed CRD from shipping a file the
    coordinators would refuse (they would keep their old policy and never get in sync).
    """
    text = json.dumps(policy_document(spec), sort_keys=True, indent=2) + "\n"
    policy = parse_policy(text, source)
    return RenderedPolicy(text=text, policy=policy, hash=policy.digest())


def configmap_name(policy_name: str) -> str:
    return f"{policy_name}-policy"


def configmap(policy_name: str, namespace: str, rendered: RenderedPolicy) -> Json:
    """The ConfigMap the coordinator pods mount (the owner reference is added by kopf.adopt)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(policy_name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                POLICY_LABEL: policy_name,
            },
            "annotations": {HASH_ANNOTATION: rendered.hash},
        },
        "data": {POLICY_KEY: rendered.text},
    }


def is_ours(actual: Mapping[str, Any], policy_name: str) -> bool:
    """Whether an existing ConfigMap was written by this operator for this policy."""
    labels = actual.get("metadata", {}).get("labels") or {}
    return bool(
        labels.get("app.kubernetes.io/managed-by") == MANAGED_BY
        and labels.get(POLICY_LABEL) == policy_name
    )


def configmap_needs_update(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether ``actual`` lacks anything of ``desired``: data, labels, annotations, owner.

    Labels and annotations others added are left alone; only ours are compared.
    """
    if (actual.get("data") or {}) != desired.get("data"):
        return True
    a_meta, d_meta = actual.get("metadata", {}), desired.get("metadata", {})
    for field in ("labels", "annotations"):
        have = a_meta.get(field) or {}
        if any(have.get(k) != v for k, v in (d_meta.get(field) or {}).items()):
            return True
    have_owners = {ref.get("uid") for ref in a_meta.get("ownerReferences") or []}
    return any(ref.get("uid") not in have_owners for ref in d_meta.get("ownerReferences") or [])


def configmap_update(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> Json:
    """The body of a replace (PUT): ``desired`` merged over ``actual``, at its resourceVersion.

    Foreign labels and annotations stay; owner references become ours only (a controller
    owner left from an earlier policy of the same name is replaced, not duplicated).
    """
    a_meta, d_meta = actual.get("metadata", {}), desired.get("metadata", {})
    body: Json = plain(desired)
    meta = body["metadata"]
    meta["resourceVersion"] = a_meta.get("resourceVersion")
    for field in ("labels", "annotations"):
        meta[field] = {**plain(a_meta.get(field) or {}), **(d_meta.get(field) or {})}
    return body


# -- which pods are coordinators -----------------------------------------------------------


def label_selector(selector: Mapping[str, Any] | None) -> V1LabelSelector | None:
    """``spec.selector`` as the API's LabelSelector object; None selects nothing."""
    if selector is None:
        return None
    expressions = [
        V1LabelSelectorRequirement(
            key=expr["key"], operator=expr["operator"], values=list(expr.get("values") or [])
        )
        for expr in selector.get("matchExpressions") or []
    ]
    return V1LabelSelector(
        match_labels={str(k): str(v) for k, v in (selector.get("matchLabels") or {}).items()},
        match_expressions=expressions,
    )


def label_selector_query(selector: Mapping[str, Any] | None) -> str | None:
    """A LabelSelector as the API's ``labelSelector`` query; None selects nothing.

    As everywhere in Kubernetes, an empty selector (``{}``) selects every pod. The list
    calls take only this query form, and neither Python client can write it from a
    ``V1LabelSelector`` (client-go's ``metav1.LabelSelectorAsSelector`` has no counterpart
    there), so it is written here, from the library's object.
    """
    found = label_selector(selector)
    if found is None:
        return None
    terms = [f"{k}={v}" for k, v in sorted((found.match_labels or {}).items())]
    for expr in found.match_expressions or []:
        key, op, values = expr.key, expr.operator, ",".join(expr.values or [])
        if op == "In":
            terms.append(f"{key} in ({values})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({values})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
        else:
            raise ValueError(f"selector.matchExpressions: unknown operator {op!r}")
    return ",".join(terms)


@dataclass(frozen=True)
class Target:
    """A selected coordinator pod: where its ``/status`` is, or why it cannot be read."""

    pod: str
    url: str | None
    error: str | None = None


def coordinator_targets(
    pods: Sequence[Mapping[str, Any]], default_port: int = DEFAULT_STATUS_PORT
) -> list[Target]:
    """The running pods among ``pods`` (being deleted, pending or finished ones are not
    coordinators), sorted by name, with the URL of their ``/status``."""
    targets: list[Target] = []
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status") or {}
        ip = status.get("podIP")
        if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
            continue
        name = str(meta.get("name"))
        raw = (meta.get("annotations") or {}).get(STATUS_PORT_ANNOTATION)
        port = default_port
        if raw is not None:
            try:
                port = int(raw)
            except ValueError:
                port = 0
            if not 1 <= port <= 65535:
                error = f"annotation {STATUS_PORT_ANNOTATION}: {raw!r} is not a port"
                targets.append(Target(name, None, error))
                continue
        host = f"[{ip}]" if ":" in ip else ip
        targets.append(Target(name, f"http://{host}:{port}/status"))
    return sorted(targets, key=lambda t: t.pod)


# -- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """Whether the ConfigMap holds the spec's policy; reason and message for the condition."""

    ok: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """One coordinator's ``/status``: the hash it runs, or why it could not be read."""

    pod: str
    hash: str | None
    error: str | None = None


def timestamp(now: datetime.datetime) -> str:
    """RFC 3339 in UTC, whole seconds: the form of metav1.Time."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _names(pods: Sequence[str]) -> str:
    shown = ", ".join(pods[:MAX_NAMED])
    return shown if len(pods) <= MAX_NAMED else f"{shown} and {len(pods) - MAX_NAMED} more"


def compute_status(
    *,
    generation: int,
    policy_hash: str | None,
    applied: Applied,
    observations: Sequence[Observation],
    previous: Mapping[str, Any] | None,
    now: datetime.datetime,
    rollout_grace: datetime.timedelta = ROLLOUT_GRACE,
) -> Json:
    """The whole status subresource from what was written and what the coordinators run.

    ``policy_hash`` is the hash of the policy the ConfigMap holds (the spec's when
    ``applied.ok``, else the last one applied, if any). Conditions:

    - Applied: True/ConfigMapWritten, or False with ``applied``'s reason.
    - Ready: True when applied and every selected coordinator runs ``policy_hash``
      (AllCoordinatorsInSync) or none is selected (NoCoordinators); False while some
      do not yet (Rollout), or with Applied's reason when not applied.
    - Degraded: True when a coordinator's /status cannot be read (CoordinatorUnreachable)
      or some run another policy longer than ``rollout_grace`` after Ready turned False
      (CoordinatorsOutOfSync); else False/AsExpected.

    lastTransitionTime changes only when a condition's status does.
    """
    prev = previous or {}
    prev_conditions = {c.get("type"): c for c in prev.get("conditions") or []}
    in_sync = [o.pod for o in observations if o.hash is not None and o.hash == policy_hash]
    unreachable = [o for o in observations if o.hash is None]
    behind = [o for o in observations if o.hash is not None and o.hash != policy_hash]
    total = len(observations)

    def condition(kind: str, ok: bool, reason: str, message: str) -> Json:
        status = "True" if ok else "False"
        before = prev_conditions.get(kind)
        since = (
            before["lastTransitionTime"]
            if before and before.get("status") == status and before.get("lastTransitionTime")
            else timestamp(now)
        )
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }

    if applied.ok:
        applied_cond = condition("Applied", True, "ConfigMapWritten", applied.message)
    else:
        applied_cond = condition("Applied", False, applied.reason, applied.message)

    if not applied.ok:
        ready = condition("Ready", False, applied.reason, applied.message)
    elif total == 0:
        ready = condition("Ready", True, "NoCoordinators", "no running pod matches spec.selector")
    elif len(in_sync) == total:
        ready = condition(
            "Ready",
            True,
            "AllCoordinatorsInSync",
            f"all {total} coordinators run policy {policy_hash}",
        )
    else:
        waiting = [o.pod for o in observations if o.pod not in in_sync]
        ready = condition(
            "Ready",
            False,
            "Rollout",
            f"{len(in_sync)} of {total} coordinators run policy {policy_hash};"
            f" waiting for {_names(waiting)}",
        )

    not_ready_since = parse_timestamp(ready["lastTransitionTime"])
    if unreachable:
        degraded = condition(
            "Degraded",
            True,
            "CoordinatorUnreachable",
            "cannot read /status of "
            + _names([f"{o.pod} ({o.error or 'no answer'})" for o in unreachable]),
        )
    elif applied.ok and behind and now - not_ready_since >= rollout_grace:
        degraded = condition(
            "Degraded",
            True,
            "CoordinatorsOutOfSync",
            f"{_names([f'{o.pod} ({o.hash})' for o in behind])} still run another policy"
            f" than {policy_hash} after {int(rollout_grace.total_seconds())} s",
        )
    else:
        degraded = condition("Degraded", False, "AsExpected", "all coordinators answer")

    status: Json = {
        "observedGeneration": generation,
        **({"policyHash": policy_hash} if policy_hash else {}),
        "coordinators": total,
        "coordinatorsInSync": len(in_sync),
        "conditions": [ready, applied_cond, degraded],
    }
    return status


def condition_of(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            found: Mapping[str, Any] = cond
            return found
    return None


# -- helpers -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
