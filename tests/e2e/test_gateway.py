"""The REST gateway in front of real services: the contract, who may do what, failures.

The stack is the usual one (coordinator, payments, inventory, orders, saga)
plus the gateway process, which serves REST on a port of its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from dtx_cli.processes import free_port
from dtx_gateway.auth import mint_token
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SECRET = "e2e-gateway-secret-0123456789abcdef"


def gateway_services() -> tuple[str, ...]:
    """The gateway, and the notifications service once it exists."""
    try:
        has_notifications = importlib.util.find_spec("dtx_notifications.main") is not None
    except ModuleNotFoundError:
        has_notifications = False
    return ("gateway", "notifications") if has_notifications else ("gateway",)


def gateway_stack(
    run_dir: Path, new_database: Callable[[str], str], infra: Any, **env: str
) -> tuple[Stack, str]:
    """A started stack with the gateway; returns it and the gateway's base URL."""
    port = free_port()
    services = gateway_services()
    stack = Stack(
        run_dir,
        new_database,
        with_saga=True,
        extra_services=services,
        kafka_bootstrap=(
            str(infra.endpoints().kafka_bootstrap) if "notifications" in services else None
        ),
        env={"DTX_JWT_SECRET": SECRET, "DTX_GATEWAY_PORT": str(port), **env},
    ).build()
    try:
        stack.start()
    except Exception:
        stack.stop()
        raise
    return stack, f"http://127.0.0.1:{port}"


@pytest.fixture
async def gateway(
    run_dir: Path, new_database: Callable[[str], str], infra: Any
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    stack, base = gateway_stack(run_dir, new_database, infra)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield stack, http
    finally:
        await stack.close_channels()
        stack.stop()


def auth(role: str, sub: str, ttl: float = 600, secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(secret, role, sub, ttl)}"}


# Minted at import, long before its tests run in a full session: give it a day.
ADMIN = auth("admin", "ops-ada", ttl=86_400)


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    error: dict[str, str] = body["error"]
    return error


async def open_account(http: httpx.AsyncClient, balance: int, owner: str = "Ada") -> str:
    response = await http.post(
        "/v1/accounts",
        json={"owner": owner, "currency": "EUR", "balance_minor": balance},
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["id"]
    return account_id


async def add_product(http: httpx.AsyncClient, sku: str, price: int, stock: int) -> None:
    response = await http.post(
        "/v1/products",
        json={"sku": sku, "name": sku.title(), "price_minor": price, "stock": stock},
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text


async def place(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    account_id: str,
    items: dict[str, int],
    *,
    key: str | None = None,
    protocol: str = "2pc",
) -> httpx.Response:
    return await http.post(
        "/v1/orders",
        json={
            "account_id": account_id,
            "items": [{"sku": s, "quantity": q} for s, q in items.items()],
            "protocol": protocol,
        },
        headers={**headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


async def test_the_contract_end_to_end(gateway: tuple[Stack, httpx.AsyncClient]) -> None:
    stack, http = gateway
    opened = await http.post(
        "/v1/accounts",
        json={"owner": "Ada", "currency": "EUR", "balance_minor": 10_000},
        headers=ADMIN,
    )
    assert opened.status_code == 201, opened.text
    account = opened.json()
    assert set(account) == {"id", "owner", "currency", "balance_minor", "created_at"}
    assert (account["owner"], account["currency"], account["balance_minor"]) == (
        "Ada",
        "EUR",
        10_000,
    )
    customer = auth("customer", account["id"])

    created = await http.post(
        "/v1/products",
        json={"sku": "WIDGET-1", "name": "Widget", "price_minor": 250, "stock": 10},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    assert created.json() == {
        "sku": "WIDGET-1",
        "name": "Widget",
        "price_minor": 250,
        "currency": "EUR",
        "available": 10,
        "reserved": 0,
    }
    again = await http.post(
        "/v1/products",
        json={"sku": "WIDGET-1", "name": "Widget", "price_minor": 250, "stock": 10},
        headers=ADMIN,
    )
    assert error_of(again, 409)["code"] == "already_exists"
    product = await http.get("/v1/products/WIDGET-1", headers=customer)
    assert product.json()["available"] == 10

    placed = await place(http, customer, account["id"], {"WIDGET-1": 2}, key="first-order")
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert order["status"] == "confirmed", order
    assert order["total_minor"] == 500
    assert order["currency"] == "EUR"
    assert order["protocol"] == "2pc"
    assert order["reason"] == ""
    assert order["items"] == [{"sku": "WIDGET-1", "quantity": 2, "unit_price_minor": 250}]
    assert (await http.get(f"/v1/orders/{order['id']}", headers=customer)).json() == order
    listed = await http.get("/v1/orders", params={"account_id": account["id"]}, headers=customer)
    assert [o["id"] for o in listed.json()["orders"]] == [order["id"]]
    balance = await http.get(f"/v1/accounts/{account['id']}", headers=customer)
    assert balance.json()["balance_minor"] == 9_500

    # 9 of the 8 left: the saga is refused by inventory and says so.
    rejected = await place(http, customer, account["id"], {"WIDGET-1": 9}, protocol="saga")
    assert rejected.status_code == 201, rejected.text
    assert rejected.json()["protocol"] == "saga"
    assert rejected.json()["status"] in {"rejected", "cancelled"}, rejected.json()
    assert "WIDGET-1" in rejected.json()["reason"]

    restocked = await http.post(
        "/v1/products/WIDGET-1/restock", json={"quantity": 5}, headers=ADMIN
    )
    assert restocked.status_code == 200, restocked.text
    assert restocked.json()["available"] == 8 + 5
    assert (
        error_of(
            await http.post("/v1/products/NOPE/restock", json={"quantity": 5}, headers=ADMIN), 404
        )["code"]
        == "not_found"
    )

    done = await http.get("/v1/transactions", params={"state": "done"}, headers=ADMIN)
    assert done.status_code == 200, done.text
    by_gid = {t["gid"]: t for t in done.json()["transactions"]}
    assert done.json()["unavailable"] == []
    assert by_gid[order["gid"]]["kind"] == "2pc"
    assert by_gid[order["gid"]]["state"] == "committed"
    assert by_gid[rejected.json()["gid"]]["kind"] == "saga"
    assert (await http.get("/v1/transactions", params={"state": "in_doubt"}, headers=ADMIN)).json()[
        "transactions"
    ] == []

    shown = await http.get(f"/v1/transactions/{order['gid']}", headers=ADMIN)
    assert shown.status_code == 200, shown.text
    txn = shown.json()
    assert (txn["state"], txn["outcome"], txn["group"]) == ("committed", "committed", "done")
    branches = {b["branch"]: b for b in txn["branches"]}
    # The order's own branch is prepared and committed by orders (delegated to it).
    assert {k: b["state"] for k, b in branches.items()} == {
        "order": "delegated",
        "payment": "committed",
        "stock": "committed",
    }
    saga = (await http.get(f"/v1/transactions/{rejected.json()['gid']}", headers=ADMIN)).json()
    assert (saga["kind"], saga["state"], saga["outcome"]) == ("saga", "compensated", "aborted")
    stock_step = next(b for b in saga["branches"] if b["branch"] == "stock")
    assert stock_step["state"] == "refused"
    [attempt] = stock_step["attempts"]
    assert (attempt["action"], attempt["attempt"], attempt["result"]) == ("execute", 1, "no")
    assert "WIDGET-1" in attempt["detail"]

    refused = await http.post(
        f"/v1/transactions/{order['gid']}/retry", json={"reason": "just checking"}, headers=ADMIN
    )
    assert error_of(refused, 409)["code"] == "failed_precondition"
    unknown = await http.post(
        "/v1/transactions/no-such-gid/abort", json={"reason": "typo"}, headers=ADMIN
    )
    assert error_of(unknown, 404)["code"] == "not_found"

    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await http.get(path)).status_code == 200, path
    metrics = (await http.get("/metrics")).text
    assert 'dtx_http_requests_total{method="POST",route="/v1/orders",status="201"}' in metrics
    assert (
        'dtx_http_request_seconds_bucket{le="0.005",method="GET",route="/v1/orders/{order_id}"}'
        in metrics
        or ('route="/v1/orders/{order_id}"' in metrics)
    )
    # SIGTERM: the gateway drains and exits cleanly under the runtime's control.
    assert stack.procs["gateway"].terminate(15) == 0


async def test_the_authorisation_matrix(gateway: tuple[Stack, httpx.AsyncClient]) -> None:
    _, http = gateway
    alice_id = await open_account(http, 5_000, "Alice")
    bob_id = await open_account(http, 5_000, "Bob")
    await add_product(http, "GADGET", 100, 50)
    alice, bob = auth("customer", alice_id), auth("customer", bob_id)
    order = (await place(http, alice, alice_id, {"GADGET": 1})).json()

    # Who you are: no token, expired, forged, not a bearer token, a role that does not exist.
    now = int(time.time())
    unknown_role = jwt.encode({"sub": "x", "role": "root", "exp": now + 60}, SECRET, "HS256")
    for headers in (
        {},
        auth("admin", "ops", ttl=-30),
        auth("admin", "ops", secret="another-secret-of-enough-length-123"),
        {"Authorization": "Basic b3BzOnNlY3JldA=="},
        {"Authorization": f"Bearer {unknown_role}"},
    ):
        response = await http.get(f"/v1/accounts/{alice_id}", headers=headers)
        assert error_of(response, 401)["code"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    # What a customer may not do at all: 403.
    admin_only: list[tuple[str, str, Any]] = [
        ("POST", "/v1/accounts", {"owner": "x", "currency": "EUR", "balance_minor": 1}),
        ("POST", "/v1/products", {"sku": "X", "name": "x", "price_minor": 1, "stock": 1}),
        ("POST", "/v1/products/GADGET/restock", {"quantity": 1}),
        ("GET", "/v1/transactions", None),
        ("GET", f"/v1/transactions/{order['gid']}", None),
        ("POST", f"/v1/transactions/{order['gid']}/retry", {"reason": "x"}),
        ("POST", f"/v1/transactions/{order['gid']}/abort", {"reason": "x"}),
    ]
    for method, path, body in admin_only:
        response = await http.request(method, path, json=body, headers=alice)
        assert error_of(response, 403)["code"] == "forbidden", (method, path)

    # Someone else's things do not exist for a customer: 404, as for a made-up id.
    for path in (
        f"/v1/accounts/{alice_id}",
        f"/v1/accounts/{alice_id}/notifications",
        f"/v1/orders/{order['id']}",
        f"/v1/orders?account_id={alice_id}",
    ):
        assert error_of(await http.get(path, headers=bob), 404)["code"] == "not_found", path
    made_up = await http.get(f"/v1/accounts/{uuid.uuid4()}", headers=bob)
    assert error_of(made_up, 404)["code"] == "not_found"
    stolen = await place(http, bob, alice_id, {"GADGET": 1})
    assert error_of(stolen, 404)["code"] == "not_found"
    assert (await http.get(f"/v1/accounts/{alice_id}", headers=ADMIN)).json()[
        "balance_minor"
    ] == 4_900

    # And their own things they see.
    assert (await http.get(f"/v1/orders/{order['id']}", headers=alice)).status_code == 200
    assert (await http.get("/v1/products/GADGET", headers=bob)).status_code == 200
    assert (await http.get(f"/v1/orders/{order['id']}", headers=ADMIN)).status_code == 200


async def test_idempotency_keys_and_request_limits(
    gateway: tuple[Stack, httpx.AsyncClient],
) -> None:
    _, http = gateway
    account_id = await open_account(http, 10_000)
    await add_product(http, "BOLT", 10, 100)
    customer = auth("customer", account_id)

    first = await place(http, customer, account_id, {"BOLT": 3}, key="retry-me")
    replay = await place(http, customer, account_id, {"BOLT": 3}, key="retry-me")
    assert first.status_code == 201, first.text
    assert replay.status_code in (200, 201)
    assert replay.json()["id"] == first.json()["id"]
    listed = await http.get("/v1/orders", params={"account_id": account_id}, headers=customer)
    assert len(listed.json()["orders"]) == 1
    conflict = await place(http, customer, account_id, {"BOLT": 4}, key="retry-me")
    error = error_of(conflict, 409)
    assert error["code"] == "idempotency_conflict"
    assert "Idempotency-Key" in error["message"]
    assert (await http.get(f"/v1/accounts/{account_id}", headers=ADMIN)).json()[
        "balance_minor"
    ] == 9_970

    missing = await http.post(
        "/v1/orders",
        json={"account_id": account_id, "items": [{"sku": "BOLT", "quantity": 1}]},
        headers=customer,
    )
    assert "Idempotency-Key" in error_of(missing, 422)["message"]
    too_long = await place(http, customer, account_id, {"BOLT": 1}, key="k" * 201)
    assert "Idempotency-Key" in error_of(too_long, 422)["message"]

    invalid = await place(http, customer, account_id, {"BOLT": 0})
    assert "items[0].quantity" in error_of(invalid, 422)["message"]
    unknown_sku = await place(http, customer, account_id, {"NOPE": 1})
    assert error_of(unknown_sku, 404)["code"] == "not_found"

    huge = await http.post(
        "/v1/accounts",
        json={"owner": "x" * 70_000, "currency": "EUR", "balance_minor": 1},
        headers=ADMIN,
    )
    assert error_of(huge, 413)["code"] == "payload_too_large"


async def test_a_backend_down_is_503_with_retry_after(
    gateway: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, http = gateway
    account_id = await open_account(http, 1_000)
    await add_product(http, "NUT", 10, 100)
    customer = auth("customer", account_id)
    order = (await place(http, customer, account_id, {"NUT": 1})).json()

    stack.procs["orders"].kill()
    for response in (
        await http.get(f"/v1/orders/{order['id']}", headers=customer),
        await place(http, customer, account_id, {"NUT": 1}),
        await http.get("/v1/orders", params={"account_id": account_id}, headers=customer),
    ):
        error = error_of(response, 503)
        assert error["code"] == "unavailable"
        assert "orders" in error["message"]
        assert int(response.headers["Retry-After"]) >= 1
    # Other backends still answer through the same gateway.
    assert (await http.get(f"/v1/accounts/{account_id}", headers=customer)).status_code == 200

    async def not_ready() -> bool:
        return (await http.get("/readyz")).status_code == 503

    await stack.wait_until(not_ready, timeout=15, what="/readyz to report orders down")
    report = (await http.get("/readyz")).json()
    assert "orders" in report["failures"]
    assert report["backends"]["payments"] == "SERVING"

    stack.procs["orders"].start()
    await stack.wait_until(
        lambda: _ok(http, f"/v1/orders/{order['id']}", customer),
        timeout=30,
        what="orders to answer through the gateway again",
    )


async def _ok(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> bool:
    await asyncio.sleep(0)
    return (await http.get(path, headers=headers)).status_code == 200
