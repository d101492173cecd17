"""The few Kubernetes API calls the handlers make beyond kopf's own, over aiohttp.

Credentials come from kopf's own login functions (in-cluster service account first, else
the kubeconfig), so the operator has the same identity for its watches and for these calls.
On 401 (a rotated service-account token) the credentials are read again once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from dtx_operator import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

Json = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer of the API server; ``status`` is the HTTP code."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig: cannot reach the API")
    return info


class KubeApi:
    """A small JSON client of the API server."""

    def __init__(self, settings: kopf.OperatorSettings, timeout: float = 10.0) -> None:
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def _connect(self) -> aiohttp.ClientSession:
        info = login(self._settings)
        self._server = info.server.rstrip("/")
        return aiohttp.ClientSession(
            headers={**info.as_http_headers(), "Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
            timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Json | None:
        """The decoded answer; None for 404 on GET; ApiError for any other failure."""
        for attempt in (1, 2):
            if self._session is None:
                self._session = self._connect()
            async with self._session.request(
                method,
                self._server + path,
                params=params,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": content_type} if body is not None else None,
            ) as resp:
                if resp.status == 401 and attempt == 1:
                    log.info("API answered 401; reading the credentials again")
                    await self.close()
                    continue
                if resp.status == 404 and method == "GET":
                    return None
                text = await resp.text()
                if resp.status >= 300:
                    try:
                        message = str(json.loads(text).get("message", text))
                    except (ValueError, AttributeError):
                        message = text
                    raise ApiError(resp.status, method, path, message.strip())
                answer: Json = json.loads(text)
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the calls the handlers make ---------------------------------------------------

    async def get_configmap(self, namespace: str, name: str) -> Json | None:
        return await self.request("GET", _configmap_path(namespace, name))

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> Json:
        created = await self.request(
            "POST", f"/api/v1/namespaces/{quote(namespace)}/configmaps", body=body
        )
        assert created is not None
        return created

    async def replace_configmap(self, namespace: str, name: str, body: Mapping[str, Any]) -> Json:
        replaced = await self.request("PUT", _configmap_path(namespace, name), body=body)
        assert replaced is not None
        return replaced

    async def list_pods(self, namespace: str, label_selector: str) -> list[Json]:
        answer = await self.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/pods",
            params={"labelSelector": label_selector},
        )
        items: list[Json] = (answer or {}).get("items") or []
        return items

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )


def _configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}"
