"""Thin kopf handlers: write the ConfigMap, read the coordinators back, patch the status.

One level-triggered ``reconcile`` does everything; create/update/resume run it at once
and a timer every few seconds, which also repairs a ConfigMap edited or deleted by hand
and follows coordinators coming and going. Deleting a policy needs no handler (so kopf
adds no finalizer): the ConfigMap's owner reference lets the garbage collector remove it.

kopf keeps its own bookkeeping in annotations under ``dtx.dev/`` (progress, last handled
spec) and the status is ours alone; it is patched only when it changes, so a quiet
cluster sees no writes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from dtx_operator import GROUP, PLURAL, VERSION, mapping
from dtx_operator.kubeapi import KubeApi, describe
from dtx_runtime.errors import ConfigError

TIMER_INTERVAL_S = 3.0
PROBE_TIMEOUT_S = 1.0


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "dtx.dev/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="dtx.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="dtx.dev", key="last-handled-configuration"
    )
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING  # Events for warnings and errors only
    settings.posting.reporting_component = "dtx-operator"
    # Serve what exists at startup; no list/watch of CRDs and namespaces (less RBAC).
    settings.scanning.disabled = True
    # Watches that end on the client side too: a silently dropped connection can't stall them.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    api = memo["api"] = KubeApi()
    memo["probe"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S))
    # With scanning off a CRD installed later would go unnoticed: better exit (and be
    # restarted) than run idle.
    if not await api.group_version_served(GROUP, VERSION):
        await _close_sessions(memo)
        raise kopf.PermanentError(
            f"{GROUP}/{VERSION} is not served: install the CRD (charts/dtx-crds) first"
        )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await _close_sessions(memo)


async def _close_sessions(memo: kopf.Memo) -> None:
    await memo["api"].close()
    await memo["probe"].close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def apply(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await reconcile(body, memo, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL_S)
async def observe(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await reconcile(body, memo, logger)


async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
    # memo is per object: the handlers and the timer of one policy take turns.
    lock: asyncio.Lock = memo.setdefault("lock", asyncio.Lock())
    async with lock:
        await _reconcile(body, memo, memo["api"], memo["probe"], logger)


async def _reconcile(
    body: kopf.Body,
    memo: kopf.Memo,
    api: KubeApi,
    probe: aiohttp.ClientSession,
    logger: kopf.Logger,
) -> None:
    name, namespace = body.metadata.name, body.metadata.namespace
    assert name is not None
    assert namespace is not None
    if body.metadata.get("deletionTimestamp"):
        return
    spec = mapping.plain(body.spec)
    stored = mapping.plain(body.get("status") or {})
    # What this process wrote last is newer than a body that may not show it yet (the
    # handler's body is its event's; the watch lags our own patches).
    previous: dict[str, Any] = memo.get("status") or stored
    policy_hash: str | None = previous.get("policyHash")
    try:
        rendered = mapping.render_policy(spec)
    except ConfigError as exc:
        applied = mapping.Applied(False, "InvalidPolicy", str(exc))
    else:
        applied = await _write_configmap(api, body, rendered, logger)
        if applied.ok:
            policy_hash = rendered.hash
    if not applied.ok:
        # A Warning event per new failure, not one per timer round.
        before = mapping.condition_of(previous, "Applied") or {}
        if (before.get("reason"), before.get("message")) != (applied.reason, applied.message):
            logger.warning("policy not applied (%s): %s", applied.reason, applied.message)
            kopf.warn(body, reason=applied.reason, message=applied.message)
    try:
        observations = await _observe(api, probe, namespace, spec.get("selector"))
    except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
        # Without the pods nothing true can be said of the coordinators: the next round.
        logger.warning("cannot list the coordinator pods: %s", _failure(exc))
        return
    status = mapping.compute_status(
        generation=int(body.metadata.get("generation") or 0),
        policy_hash=policy_hash,
        applied=applied,
        observations=observations,
        previous=previous,
        now=datetime.datetime.now(datetime.UTC),
    )
    if status == stored:
        memo["status"] = status
        return
    # A stale ``stored`` only costs a patch that changes nothing (no new resourceVersion).
    patch: dict[str, Any] = {key: None for key in stored if key not in status}
    patch.update(status)
    try:
        await api.patch_policy_status(namespace, name, patch)
        memo["status"] = status
    except ApiException as exc:
        if exc.status != 404:  # 404: deleted meanwhile, nothing left to report on
            logger.warning("cannot patch the status: %s", describe(exc))
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning("cannot patch the status: %s", exc)


async def _write_configmap(
    api: KubeApi, body: kopf.Body, rendered: mapping.RenderedPolicy, logger: kopf.Logger
) -> mapping.Applied:
    name, namespace = body.metadata.name, body.metadata.namespace
    assert name is not None
    assert namespace is not None
    desired = mapping.configmap(name, namespace, rendered)
    kopf.adopt(desired, owner=body)
    cm_name = desired["metadata"]["name"]
    written = mapping.Applied(
        True, "ConfigMapWritten", f"ConfigMap {cm_name} holds policy {rendered.hash}"
    )
    try:
        actual = await api.get_configmap(namespace, cm_name)
        if actual is None:
            await api.create_configmap(namespace, desired)
            logger.info("ConfigMap %s created with policy %s", cm_name, rendered.hash)
        elif not mapping.is_ours(actual, name):
            message = f"ConfigMap {cm_name} exists and is not managed by {mapping.MANAGED_BY}"
            return mapping.Applied(False, "ConfigMapConflict", message)
        elif mapping.configmap_needs_update(actual, desired):
            await api.replace_configmap(
                namespace, cm_name, mapping.configmap_update(actual, desired)
            )
            logger.info("ConfigMap %s updated to policy %s", cm_name, rendered.hash)
    except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
        # A conflict (someone wrote in between) or an outage: the timer tries again.
        return mapping.Applied(False, "ConfigMapWriteFailed", _failure(exc)[:1000])
    return written


def _failure(exc: Exception) -> str:
    """An API error as its status and message; a network error as itself."""
    return describe(exc) if isinstance(exc, ApiException) else str(exc)


async def _observe(
    api: KubeApi, probe: aiohttp.ClientSession, namespace: str, selector: Any
) -> list[mapping.Observation]:
    query = mapping.label_selector_query(selector)
    if query is None:
        return []
    pods = await api.list_pods(namespace, query)
    targets = mapping.coordinator_targets(pods)
    return list(await asyncio.gather(*(_read_status(probe, t) for t in targets)))


async def _read_status(probe: aiohttp.ClientSession, target: mapping.Target) -> mapping.Observation:
    if target.url is None:
        return mapping.Observation(target.pod, None, target.error)
    try:
        async with probe.get(target.url) as resp:
            if resp.status != 200:
                return mapping.Observation(target.pod, None, f"HTTP {resp.status}")
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return mapping.Observation(target.pod, None, f"{type(exc).__name__}: {exc}".strip(": "))
    found = answer.get("policyHash") if isinstance(answer, dict) else None
    if not isinstance(found, str):
        return mapping.Observation(target.pod, None, "no policyHash in /status")
    return mapping.Observation(target.pod, found)
