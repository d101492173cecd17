"""The operator's API adapter: credentials, ConfigMap objects, API errors, the 401 retry.

Nothing here reaches an API server (tests/e2e/test_operator.py does); the library's
objects and exceptions are made directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from dtx_operator import kubeapi, mapping

pytestmark = pytest.mark.unit

OWNER: dict[str, Any] = {
    "apiVersion": "dtx.dev/v1alpha1",
    "kind": "TransactionPolicy",
    "metadata": {"name": "demo", "namespace": "dtx", "uid": "u-1", "labels": {"team": "a"}},
}


def _desired() -> dict[str, Any]:
    rendered = mapping.render_policy({"maxInFlight": 8})
    desired = mapping.configmap("demo", "dtx", rendered)
    kopf.adopt(desired, owner=kopf.Body(cast(kopf.RawBody, OWNER)))
    return desired


@pytest.fixture
async def api_client() -> Any:
    api = client.ApiClient(client.Configuration(host="https://127.0.0.1:1"))
    try:
        yield api
    finally:
        await api.close()


# -- ConfigMaps as the library's objects ------------------------------------------------------


async def test_configmap_object_round_trips_what_the_operator_writes(
    api_client: client.ApiClient,
) -> None:
    desired = _desired()
    assert desired["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert desired["metadata"]["labels"]["team"] == "a"  # kopf.adopt copies the owner's labels
    obj = kubeapi.configmap_object(desired)
    assert isinstance(obj, client.V1ConfigMap)
    assert obj.metadata.owner_references[0].block_owner_deletion is True
    assert api_client.sanitize_for_serialization(obj) == desired

    actual = {
        **desired,
        "metadata": {
            **desired["metadata"],
            "resourceVersion": "41",
            "uid": "cm-1",
            "labels": {"foreign": "x"},
        },
    }
    update = mapping.configmap_update(actual, desired)
    assert api_client.sanitize_for_serialization(kubeapi.configmap_object(update)) == update


def test_configmap_object_refuses_what_it_would_drop() -> None:
    desired = _desired()
    with pytest.raises(ValueError, match="generateName"):
        kubeapi.configmap_object({**desired, "metadata": {"generateName": "x-"}})
    with pytest.raises(ValueError, match="binaryData"):
        kubeapi.configmap_object({**desired, "binaryData": {}})


def test_label_selector_is_the_library_object() -> None:
    found = mapping.label_selector(
        {
            "matchLabels": {"app": "coordinator"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}],
        }
    )
    assert isinstance(found, client.V1LabelSelector)
    assert found.match_labels == {"app": "coordinator"}
    assert [(e.key, e.operator, e.values) for e in found.match_expressions] == [
        ("tier", "In", ["x"])
    ]
    assert mapping.label_selector(None) is None
    with pytest.raises(ValueError, match="unknown operator"):
        mapping.label_selector_query(
            {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}
        )


# -- API errors ---------------------------------------------------------------------------------


def _api_error(status: int, body: bytes | None, reason: str = "Conflict") -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = body
    return exc


def test_describe_takes_the_status_message() -> None:
    status = {
        "kind": "Status",
        "status": "Failure",
        "message": 'Operation cannot be fulfilled on configmaps "demo-policy": modified',
        "reason": "Conflict",
        "code": 409,
    }
    exc = _api_error(409, json.dumps(status).encode())
    assert kubeapi.describe(exc) == (
        'HTTP 409: Operation cannot be fulfilled on configmaps "demo-policy": modified'
    )
    assert kubeapi.describe(_api_error(502, b"bad gateway\n")) == "HTTP 502: bad gateway"
    assert kubeapi.describe(_api_error(503, None, "Service Unavailable")) == (
        "HTTP 503: Service Unavailable"
    )


# -- credentials ----------------------------------------------------------------------------------


def _kubeconfig(path: Path, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(config))
    return path


async def test_credentials_from_the_kubeconfig_outside_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    configuration = await kubeapi.load_configuration(str(_kubeconfig(tmp_path / "kc", "t0k")))
    assert configuration.host == "https://127.0.0.1:6443"
    assert configuration.api_key["BearerToken"] == "Bearer t0k"


async def test_no_credentials_is_a_login_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kopf.LoginError, match="no service account and no kubeconfig"):
        await kubeapi.load_configuration(str(tmp_path / "absent"))


async def test_a_401_reloads_the_credentials_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[int] = []

    async def load(kubeconfig: str | None = None) -> client.Configuration:
        loads.append(1)
        return client.Configuration(host="https://127.0.0.1:1")

    monkeypatch.setattr(kubeapi, "load_configuration", load)
    api = kubeapi.KubeApi()
    seen: list[client.ApiClient] = []

    async def flaky(api_client: client.ApiClient) -> str:
        seen.append(api_client)
        if len(seen) == 1:
            raise ApiException(status=401, reason="Unauthorized")
        return "ok"

    async def always_401(api_client: client.ApiClient) -> str:
        raise ApiException(status=401, reason="Unauthorized")

    async def forbidden(api_client: client.ApiClient) -> str:
        raise ApiException(status=403, reason="Forbidden")

    try:
        assert await api._call(flaky) == "ok"
        assert len(loads) == 2
        assert seen[0] is not seen[1]  # a new client with the new credentials
        with pytest.raises(ApiException) as raised:
            await api._call(always_401)
        assert raised.value.status == 401
        assert len(loads) == 3  # the same client until a 401, then one reload
        with pytest.raises(ApiException):
            await api._call(forbidden)
        assert len(loads) == 3
    finally:
        await api.close()
