"""The few Kubernetes API calls the handlers make beyond kopf's own, over kubernetes_asyncio.

Credentials come from kubernetes_asyncio's own loaders, in-cluster service account first,
else the kubeconfig: the loaders kopf itself logs in with when kubernetes_asyncio is
installed (``kopf.login_via_async_client``), so the operator has one identity for its
watches and for these calls. In a pod the loader re-reads the projected token every minute;
should the API answer 401 all the same, the credentials are loaded again once.

The API's objects (``V1ConfigMap``, ``V1Pod`` ...) stop here: the handlers and
:mod:`dtx_operator.mapping` see them in their JSON form (camelCase keys, as on the wire), the
form of kopf's bodies and of the unit tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from dtx_operator import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

Json = dict[str, Any]
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"


async def load_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """The client configuration: the pod's service account, else the kubeconfig
    (``kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``)."""
    configuration = client.Configuration()
    try:
        # No annotations on this loader (kubernetes_asyncio types the rest of the package).
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        try:
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        except config.ConfigException as exc:
            raise kopf.LoginError(
                f"no service account and no kubeconfig: cannot reach the API ({exc})"
            ) from exc
    return configuration


def describe(exc: ApiException) -> str:
    """One line for an API error: the HTTP status and the API's own message (its Status)."""
    raw = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body or ""
    try:
        message = str(json.loads(raw).get("message") or raw)
    except (ValueError, AttributeError):
        message = raw
    return f"HTTP {exc.status}: {(message or exc.reason or '').strip()}"


def configmap_object(body: Mapping[str, Any]) -> client.V1ConfigMap:
    """A ConfigMap in its JSON form (as :func:`mapping.configmap` and ``kopf.adopt`` make it)
    as the library's object. Only what the operator writes is known; anything else is refused
    rather than dropped."""
    _only(body, {"apiVersion", "kind", "metadata", "data"}, "ConfigMap")
    meta: Mapping[str, Any] = body.get("metadata") or {}
    _only(
        meta,
        {"name", "namespace", "labels", "annotations", "ownerReferences", "resourceVersion"},
        "ConfigMap metadata",
    )
    owners = [_owner_reference(ref) for ref in meta.get("ownerReferences") or []]
    return client.V1ConfigMap(
        api_version=body.get("apiVersion"),
        kind=body.get("kind"),
        metadata=client.V1ObjectMeta(
            name=meta.get("name"),
            namespace=meta.get("namespace"),
            labels=_strings(meta.get("labels")),
            annotations=_strings(meta.get("annotations")),
            owner_references=owners or None,
            resource_version=meta.get("resourceVersion"),
        ),
        data=_strings(body.get("data")),
    )


def _json(api: client.ApiClient, obj: object) -> Json:
    """An API object in its JSON form: what the API server sent, less the nulls."""
    found: Json = api.sanitize_for_serialization(obj)
    return found


def _owner_reference(ref: Mapping[str, Any]) -> client.V1OwnerReference:
    _only(
        ref,
        {"apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion"},
        "ownerReference",
    )
    return client.V1OwnerReference(
        api_version=ref["apiVersion"],
        kind=ref["kind"],
        name=ref["name"],
        uid=ref["uid"],
        controller=ref.get("controller"),
        block_owner_deletion=ref.get("blockOwnerDeletion"),
    )


def _strings(value: Mapping[str, Any] | None) -> dict[str, str] | None:
    return None if value is None else {str(k): str(v) for k, v in value.items()}


def _only(fields: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{what}: fields the operator does not write: {', '.join(unknown)}")


class KubeApi:
    """The operator's client of the API server: one ``ApiClient``, made on first use."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._client: client.ApiClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _api_client(self) -> client.ApiClient:
        if self._client is None:
            self._client = client.ApiClient(await load_configuration())
        return self._client

    async def _call(self, call: Callable[[client.ApiClient], Awaitable[T]]) -> T:
        """``call`` with the client; on a first 401 with freshly loaded credentials."""
        for attempt in (1, 2):
            api = await self._api_client()
            try:
                return await call(api)
            except ApiException as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                log.info("API answered 401; reading the credentials again")
                await self.close()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the calls the handlers make ---------------------------------------------------

    async def group_version_served(self, group: str, version: str) -> bool:
        """Whether the API serves ``group/version`` (a CRD of it is installed)."""

        async def call(api: client.ApiClient) -> None:
            await client.CustomObjectsApi(api).get_api_resources(
                group, version, _request_timeout=self._timeout
            )

        try:
            await self._call(call)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def get_configmap(self, namespace: str, name: str) -> Json | None:
        """The ConfigMap, or None if there is none."""

        async def call(api: client.ApiClient) -> Json:
            found = await client.CoreV1Api(api).read_namespaced_config_map(
                name, namespace, _request_timeout=self._timeout
            )
            return _json(api, found)

        try:
            return await self._call(call)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> Json:
        configmap = configmap_object(body)

        async def call(api: client.ApiClient) -> Json:
            created = await client.CoreV1Api(api).create_namespaced_config_map(
                namespace, configmap, _request_timeout=self._timeout
            )
            return _json(api, created)

        return await self._call(call)

    async def replace_configmap(self, namespace: str, name: str, body: Mapping[str, Any]) -> Json:
        configmap = configmap_object(body)

        async def call(api: client.ApiClient) -> Json:
            replaced = await client.CoreV1Api(api).replace_namespaced_config_map(
                name, namespace, configmap, _request_timeout=self._timeout
            )
            return _json(api, replaced)

        return await self._call(call)

    async def list_pods(self, namespace: str, label_selector: str) -> list[Json]:
        """The pods that ``label_selector`` (the list call's query form) selects."""

        async def call(api: client.ApiClient) -> list[Json]:
            pods = await client.CoreV1Api(api).list_namespaced_pod(
                namespace, label_selector=label_selector, _request_timeout=self._timeout
            )
            return [_json(api, pod) for pod in pods.items or []]

        return await self._call(call)

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        """A JSON merge patch of the policy's status subresource (None removes a key)."""

        async def call(api: client.ApiClient) -> None:
            await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": dict(status)},
                _request_timeout=self._timeout,
                # Without it a dict body goes out as a JSON patch (the library picks the first
                # patch type the endpoint takes); the stubs leave this keyword out.
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]
            )

        await self._call(call)
