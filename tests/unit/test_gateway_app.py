"""The gateway app in process, over in-memory fakes of its gRPC backends.

What is checked here needs no server: the error shape and the status mapping,
the authorisation matrix, Idempotency-Key scoping, the body limit, the state
groups of transactions, the OpenAPI document, metrics. The real backends are
exercised by ``tests/e2e/test_gateway.py``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from dtx.v1 import (
    common_pb2,
    inventory_pb2,
    notifications_pb2,
    orders_pb2,
    payments_pb2,
    transactions_pb2,
)
from dtx_gateway.app import create_app
from dtx_gateway.auth import mint_token
from dtx_gateway.backends import Backends
from dtx_runtime.health import Health, Phase

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-0123456789abcdef-xyz"
TS = transactions_pb2


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def stamp(when: datetime | None = None) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    result = Timestamp()
    result.FromDatetime(when or datetime.now(UTC))
    return result


class Fake:
    """A backend: async methods named like the RPCs; ``fail[name]`` makes one raise."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name

    def _maybe_fail(self, method: str) -> None:
        code = self.world.fail.get(f"{self.name}.{method}") or self.world.fail.get(self.name)
        if code is not None:
            raise rpc_error(code, f"{self.name} says {code.name}")


class World:
    """The state behind all the fakes, shared so orders can see accounts and products."""

    def __init__(self) -> None:
        self.fail: dict[str, grpc.StatusCode] = {}
        self.accounts: dict[str, payments_pb2.Account] = {}
        self.products: dict[str, inventory_pb2.Product] = {}
        self.orders: dict[str, orders_pb2.Order] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        self.transactions: dict[str, transactions_pb2.Transaction] = {}
        self.sagas: dict[str, transactions_pb2.Transaction] = {}
        self.interventions: list[tuple[str, str, str, str]] = []
        self.calls: list[tuple[str, Any, float | None]] = []

    def backends(self) -> Backends:
        def make(name: str, cls: type[Fake]) -> Any:
            return cls(self, name)

        return Backends(
            orders=make("orders", FakeOrders),
            payments=make("payments", FakePayments),
            inventory=make("inventory", FakeInventory),
            coordinator=make("coordinator", FakeCoordinator),
            saga=make("saga", FakeSaga),
            notifications=make("notifications", FakeNotifications),
            health={
                n: make(n, FakeHealth)
                for n in ("orders", "payments", "inventory", "coordinator", "saga", "notifications")
            },
            call_timeout_s=5.0,
            order_timeout_s=30.0,
        )


def _uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: not a UUID") from None


class FakePayments(Fake):
    async def CreateAccount(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("CreateAccount")
        self.world.calls.append(("CreateAccount", request, timeout))
        account = payments_pb2.Account(
            id=str(uuid.uuid4()),
            owner=request.owner,
            currency=request.currency,
            balance_minor=request.balance_minor,
            created_at=stamp(),
        )
        self.world.accounts[account.id] = account
        return account

    async def GetAccount(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("GetAccount")
        account_id = _uuid(request.account_id, "account_id")
        if account_id not in self.world.accounts:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"account {account_id} not found")
        return self.world.accounts[account_id]


class FakeInventory(Fake):
    async def CreateProduct(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("CreateProduct")
        if request.sku in self.world.products:
            raise rpc_error(grpc.StatusCode.ALREADY_EXISTS, f"sku: {request.sku} exists")
        product = inventory_pb2.Product(
            sku=request.sku,
            name=request.name,
            price_minor=request.price_minor,
            currency="EUR",
            available=request.stock,
        )
        self.world.products[request.sku] = product
        return product

    async def GetProduct(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("GetProduct")
        if request.sku not in self.world.products:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"product {request.sku} not found")
        return self.world.products[request.sku]

    async def Restock(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("Restock")
        product = await self.GetProduct(inventory_pb2.GetProductRequest(sku=request.sku))
        product.available += request.quantity
        return product


class FakeOrders(Fake):
    async def PlaceOrder(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("PlaceOrder")
        self.world.calls.append(("PlaceOrder", request, timeout))
        account_id = _uuid(request.account_id, "account_id")
        digest = hashlib.sha256(
            json.dumps(
                [account_id, sorted((i.sku, i.quantity) for i in request.items), request.protocol]
            ).encode()
        ).hexdigest()
        if request.idempotency_key in self.world.keys:
            known_digest, order_id = self.world.keys[request.idempotency_key]
            if known_digest != digest:
                raise rpc_error(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"idempotency_key {request.idempotency_key!r} was used (order {order_id})",
                )
            return self.world.orders[order_id]
        account = self.world.accounts.get(account_id)
        if account is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"account_id {account_id} not found")
        items = []
        for i, item in enumerate(request.items):
            product = self.world.products.get(item.sku)
            if product is None:
                raise rpc_error(grpc.StatusCode.NOT_FOUND, f"items[{i}].sku: unknown sku")
            items.append(
                orders_pb2.OrderItem(
                    sku=item.sku, quantity=item.quantity, unit_price_minor=product.price_minor
                )
            )
        total = sum(i.quantity * i.unit_price_minor for i in items)
        ok = total <= account.balance_minor
        order = orders_pb2.Order(
            id=str(uuid.uuid4()),
            account_id=account_id,
            items=items,
            total_minor=total,
            currency=account.currency,
            protocol=request.protocol,
            status=orders_pb2.ORDER_STATUS_CONFIRMED if ok else orders_pb2.ORDER_STATUS_REJECTED,
            reason="" if ok else "insufficient funds",
            gid=f"order-{uuid.uuid4().hex[:12]}",
            idempotency_key=request.idempotency_key,
            created_at=stamp(),
            updated_at=stamp(),
        )
        if ok:
            account.balance_minor -= total
        self.world.orders[order.id] = order
        self.world.keys[request.idempotency_key] = (digest, order.id)
        return order

    async def GetOrder(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("GetOrder")
        order_id = _uuid(request.order_id, "order_id")
        if order_id not in self.world.orders:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"order {order_id} not found")
        return self.world.orders[order_id]

    async def ListOrders(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("ListOrders")
        account_id = _uuid(request.account_id, "account_id")
        found = [o for o in self.world.orders.values() if o.account_id == account_id]
        return orders_pb2.ListOrdersResponse(orders=found[: request.limit or 50])


class FakeNotifications(Fake):
    async def ListNotifications(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("ListNotifications")
        return notifications_pb2.ListNotificationsResponse(
            notifications=[
                notifications_pb2.Notification(
                    id="n-1",
                    account_id=request.account_id,
                    order_id=str(uuid.uuid4()),
                    event_type="order.confirmed",
                    message="confirmed",
                    created_at=stamp(),
                )
            ]
        )


class _Engine(Fake):
    store: str = ""
    states: frozenset[int] = frozenset()

    def _all(self) -> dict[str, transactions_pb2.Transaction]:
        found: dict[str, transactions_pb2.Transaction] = getattr(self.world, self.store)
        return found

    async def _get(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("Get")
        if request.gid not in self._all():
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"gid {request.gid}: no such transaction")
        return self._all()[request.gid]

    async def _list(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("List")
        rows = [
            t
            for t in self._all().values()
            if request.state == TS.TRANSACTION_STATE_UNSPECIFIED or t.state == request.state
        ]
        return TS.ListTransactionsResponse(transactions=rows[: request.limit or 50])

    async def _intervene(self, action: str, request: Any) -> Any:
        self._maybe_fail(action)
        txn = await self._get(request)
        if not request.actor or not request.reason:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "actor and reason are required")
        if action == "retry" and txn.state != TS.TRANSACTION_STATE_NEEDS_INTERVENTION:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "only NEEDS_INTERVENTION")
        self.world.interventions.append((self.name, action, request.actor, request.reason))
        return txn


class FakeCoordinator(_Engine):
    store = "transactions"

    async def GetTransaction(self, request: Any, timeout: float | None = None) -> Any:
        return await self._get(request, timeout)

    async def ListTransactions(self, request: Any, timeout: float | None = None) -> Any:
        return await self._list(request, timeout)

    async def RetryTransaction(self, request: Any, timeout: float | None = None) -> Any:
        return await self._intervene("retry", request)

    async def AbortTransaction(self, request: Any, timeout: float | None = None) -> Any:
        return await self._intervene("abort", request)


class FakeSaga(_Engine):
    store = "sagas"

    async def GetSaga(self, request: Any, timeout: float | None = None) -> Any:
        return await self._get(request, timeout)

    async def ListSagas(self, request: Any, timeout: float | None = None) -> Any:
        return await self._list(request, timeout)

    async def RetrySaga(self, request: Any, timeout: float | None = None) -> Any:
        return await self._intervene("retry", request)

    async def AbortSaga(self, request: Any, timeout: float | None = None) -> Any:
        return await self._intervene("abort", request)


class FakeHealth(Fake):
    async def Check(self, request: Any, timeout: float | None = None) -> Any:
        self._maybe_fail("Check")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


# -- fixtures --------------------------------------------------------------


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def app(world: World) -> Any:
    health = Health()
    health.phase = Phase.SERVING
    return create_app(
        jwt_secret=SECRET, backends=world.backends(), health=health, max_body_bytes=64 * 1024
    )


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield http


def bearer(role: str, sub: str, ttl: float = 300, secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(secret, role, sub, ttl)}"}


# Minted at import, long before its tests run in a full session: give it a day.
ADMIN = bearer("admin", "ops-ada", ttl=86_400)


async def seed(world: World, balance: int = 10_000) -> tuple[str, str]:
    """Two customers' accounts and a product WIDGET at 250."""
    payments = cast(FakePayments, world.backends().payments)
    a = await payments.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="a", currency="EUR", balance_minor=balance)
    )
    b = await payments.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="b", currency="EUR", balance_minor=balance)
    )
    await cast(FakeInventory, world.backends().inventory).CreateProduct(
        inventory_pb2.CreateProductRequest(sku="WIDGET", name="Widget", price_minor=250, stock=10)
    )
    return a.id, b.id


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"]


# -- authentication --------------------------------------------------------


async def test_no_token_is_401_with_www_authenticate(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/products/WIDGET")
    assert_error(response, 401, "unauthenticated", "missing bearer token")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        (bearer("admin", "ops", ttl=-60), "expired"),
        (bearer("admin", "ops", secret="x" * 40), "signature"),
        ({"Authorization": "Bearer not.a.jwt"}, "malformed"),
        ({"Authorization": "Basic b3BzOnB3"}, "missing bearer token"),
    ],
)
async def test_bad_tokens_are_401(
    client: httpx.AsyncClient, headers: dict[str, str], fragment: str
) -> None:
    response = await client.get("/v1/products/WIDGET", headers=headers)
    assert_error(response, 401, "unauthenticated", fragment)
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/accounts", {"owner": "x", "currency": "EUR", "balance_minor": 1}),
        ("POST", "/v1/products", {"sku": "A", "name": "a", "price_minor": 1, "stock": 1}),
        ("POST", "/v1/products/WIDGET/restock", {"quantity": 1}),
        ("GET", "/v1/transactions", None),
        ("GET", "/v1/transactions/g-1", None),
        ("POST", "/v1/transactions/g-1/retry", {"reason": "x"}),
        ("POST", "/v1/transactions/g-1/abort", {"reason": "x"}),
    ],
)
async def test_a_customer_on_admin_routes_is_403(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    customer = bearer("customer", str(uuid.uuid4()))
    response = await client.request(method, path, json=body, headers=customer)
    assert_error(response, 403, "forbidden", "admin")


async def test_customers_see_only_their_own_account(
    client: httpx.AsyncClient, world: World
) -> None:
    a, b = await seed(world)
    alice = bearer("customer", a)
    mine = await client.get(f"/v1/accounts/{a}", headers=alice)
    assert mine.status_code == 200
    assert mine.json()["id"] == a
    theirs = await client.get(f"/v1/accounts/{b}", headers=alice)
    nobody = await client.get(f"/v1/accounts/{uuid.uuid4()}", headers=alice)
    # Another customer's account and one that does not exist look the same.
    assert_error(theirs, 404, "not_found", b)
    assert_error(nobody, 404, "not_found")
    assert (await client.get(f"/v1/accounts/{b}", headers=ADMIN)).status_code == 200
    assert_error(
        await client.get(f"/v1/accounts/{b}/notifications", headers=alice), 404, "not_found"
    )
    own = await client.get(f"/v1/accounts/{a}/notifications", headers=alice)
    assert own.status_code == 200
    assert own.json()["notifications"][0]["delivered_at"] is None


async def test_customers_order_and_read_only_for_themselves(
    client: httpx.AsyncClient, world: World
) -> None:
    a, b = await seed(world)
    alice, bob = bearer("customer", a), bearer("customer", b)
    body = {"account_id": a, "items": [{"sku": "WIDGET", "quantity": 2}]}
    placed = await client.post("/v1/orders", json=body, headers={**alice, "Idempotency-Key": "k1"})
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert order["status"] == "confirmed"
    assert order["total_minor"] == 500
    assert order["protocol"] == "2pc"
    assert order["items"][0]["unit_price_minor"] == 250
    assert (await client.get(f"/v1/orders/{order['id']}", headers=alice)).json() == order
    assert_error(await client.get(f"/v1/orders/{order['id']}", headers=bob), 404, "not_found")
    listed = await client.get("/v1/orders", params={"account_id": a}, headers=alice)
    assert [o["id"] for o in listed.json()["orders"]] == [order["id"]]
    assert_error(
        await client.get("/v1/orders", params={"account_id": a}, headers=bob), 404, "not_found"
    )
    # Bob may not order on Alice's account, and is not told whether it exists.
    stolen = await client.post("/v1/orders", json=body, headers={**bob, "Idempotency-Key": "k2"})
    assert_error(stolen, 404, "not_found")
    assert len(world.orders) == 1


# -- orders and idempotency -----------------------------------------------


async def test_idempotency_key_replays_and_conflicts(
    client: httpx.AsyncClient, world: World
) -> None:
    a, _ = await seed(world)
    alice = {**bearer("customer", a), "Idempotency-Key": "same-key"}
    body = {"account_id": a, "items": [{"sku": "WIDGET", "quantity": 1}], "protocol": "saga"}
    first = await client.post("/v1/orders", json=body, headers=alice)
    again = await client.post("/v1/orders", json=body, headers=alice)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = {**body, "items": [{"sku": "WIDGET", "quantity": 3}]}
    conflict = await client.post("/v1/orders", json=other, headers=alice)
    assert_error(conflict, 409, "idempotency_conflict", "Idempotency-Key")
    assert first.json()["id"] not in conflict.text  # never names the other order
    # The admin's keys are the admin's: the same key is a new order, not a conflict.
    by_admin = await client.post(
        "/v1/orders", json=other, headers={**ADMIN, "Idempotency-Key": "same-key"}
    )
    assert by_admin.status_code == 201
    assert by_admin.json()["id"] != first.json()["id"]
    keys = [call[1].idempotency_key for call in world.calls if call[0] == "PlaceOrder"]
    assert len(set(keys)) == 2
    assert all(k.startswith("gw1-") and len(k) <= 200 for k in keys)
    placed = [call for call in world.calls if call[0] == "PlaceOrder"]
    assert placed[0][1].protocol == common_pb2.PROTOCOL_SAGA
    assert placed[0][2] == 30.0  # the order deadline, not the short one


@pytest.mark.parametrize("key", [None, "", "k" * 201])
async def test_idempotency_key_is_required_and_bounded(
    client: httpx.AsyncClient, world: World, key: str | None
) -> None:
    a, _ = await seed(world)
    headers = {**ADMIN, **({"Idempotency-Key": key} if key is not None else {})}
    body = {"account_id": a, "items": [{"sku": "WIDGET", "quantity": 1}]}
    response = await client.post("/v1/orders", json=body, headers=headers)
    assert_error(response, 422, "invalid_request", "Idempotency-Key")


# -- validation, errors, limits -------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"owner": "x", "currency": "EUR", "balance_minor": -1}, "body.balance_minor"),
        ({"owner": "x", "currency": "EUR", "balance_minor": 10**15 + 1}, "body.balance_minor"),
        ({"owner": "x", "currency": "EUR", "balance_minor": "100"}, "body.balance_minor"),
        ({"owner": "x", "currency": "EUR", "balance_minor": 1.5}, "body.balance_minor"),
        ({"owner": "x", "currency": "EUR", "balance_minor": True}, "body.balance_minor"),
        ({"owner": "x", "currency": "eur", "balance_minor": 1}, "body.currency"),
        ({"owner": "   ", "currency": "EUR", "balance_minor": 1}, "body.owner"),
        ({"owner": "a\x00b", "currency": "EUR", "balance_minor": 1}, "body.owner"),
        (
            {"owner": "\ud800", "currency": "EUR", "balance_minor": 1},
            "body.owner: Input should be a valid string",
        ),
        ({"owner": "x", "currency": "EUR", "balance_minor": 1, "admin": True}, "body.admin"),
        ({"currency": "EUR", "balance_minor": 1}, "body.owner: Field required"),
    ],
)
async def test_invalid_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], fragment: str
) -> None:
    raw = json.dumps(body).encode()  # ASCII escapes, so a lone surrogate survives the trip
    response = await client.post(
        "/v1/accounts", content=raw, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_request", fragment)


async def test_whole_floats_are_integers_as_in_json_schema(client: httpx.AsyncClient) -> None:
    body = {"owner": "x", "currency": "EUR", "balance_minor": 250.0}
    response = await client.post("/v1/accounts", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["balance_minor"] == 250


def test_request_schemas_use_standard_json_schema_keywords() -> None:
    """Bounds must reach the OpenAPI document as minimum/maximum, or a client (or a
    fuzzer) never learns them."""
    from dtx_gateway import schemas

    for model in (schemas.NewAccount, schemas.NewProduct, schemas.Restock, schemas.NewOrder):
        text = json.dumps(model.model_json_schema())
        assert '"ge"' not in text, model
        assert '"le"' not in text, model
    quantity = schemas.LineItem.model_json_schema()["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"]) == (1, 10_000)


async def test_malformed_json_and_bad_paths_are_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/accounts",
        content=b'{"owner": ',
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_error(response, 422, "invalid_request", "JSON")
    assert_error(
        await client.get("/v1/accounts/not-a-uuid", headers=ADMIN), 422, "invalid_request", "path"
    )
    assert_error(
        await client.get("/v1/products/bad_sku", headers=ADMIN), 422, "invalid_request", "sku"
    )
    assert_error(
        await client.get("/v1/transactions", params={"state": "stuck"}, headers=ADMIN),
        422,
        "invalid_request",
        "query.state",
    )


async def test_order_items_are_validated(client: httpx.AsyncClient, world: World) -> None:
    a, _ = await seed(world)
    headers = {**ADMIN, "Idempotency-Key": "k"}
    for items, fragment in [
        ([], "body.items"),
        ([{"sku": "WIDGET", "quantity": 0}], "body.items[0].quantity"),
        ([{"sku": "WIDGET", "quantity": 10_001}], "body.items[0].quantity"),
        ([{"sku": "-BAD", "quantity": 1}], "body.items[0].sku"),
        ([{"sku": "W", "quantity": 1}] * 51, "body.items"),
    ]:
        response = await client.post(
            "/v1/orders", json={"account_id": a, "items": items}, headers=headers
        )
        assert_error(response, 422, "invalid_request", fragment)
    response = await client.post(
        "/v1/orders",
        json={"account_id": a, "items": [{"sku": "W", "quantity": 1}], "protocol": "3pc"},
        headers=headers,
    )
    assert_error(response, 422, "invalid_request", "body.protocol")


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 422, "invalid_request"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found"),
        (grpc.StatusCode.ALREADY_EXISTS, 409, "already_exists"),
        (grpc.StatusCode.FAILED_PRECONDITION, 409, "failed_precondition"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limited"),
        (grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 503, "unavailable"),
        (grpc.StatusCode.INTERNAL, 502, "backend_error"),
        (grpc.StatusCode.UNKNOWN, 502, "backend_error"),
    ],
)
async def test_backend_statuses_map_to_http(
    client: httpx.AsyncClient,
    world: World,
    code: grpc.StatusCode,
    status: int,
    error_code: str,
) -> None:
    world.fail["payments"] = code
    response = await client.post(
        "/v1/accounts", json={"owner": "x", "currency": "EUR", "balance_minor": 1}, headers=ADMIN
    )
    assert_error(response, status, error_code)
    if status in (429, 503):
        assert int(response.headers["Retry-After"]) >= 1
    if status == 502:
        assert "says" not in response.json()["error"]["message"]  # internals stay in the log


async def test_oversized_bodies_are_413(client: httpx.AsyncClient) -> None:
    big = {"owner": "x" * 70_000, "currency": "EUR", "balance_minor": 1}
    response = await client.post("/v1/accounts", json=big, headers=ADMIN)
    assert_error(response, 413, "payload_too_large", "65536")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"owner": "'
        for _ in range(10):
            yield b"x" * 8192
        yield b'", "currency": "EUR", "balance_minor": 1}'

    streamed = await client.post(
        "/v1/accounts",
        content=chunks(),
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_error(streamed, 413, "payload_too_large")


async def test_unknown_routes_and_methods_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v2/nothing"), 404, "not_found")
    response = await client.delete("/v1/accounts", headers=ADMIN)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# -- transactions ---------------------------------------------------------


def txn(gid: str, state: int, attempts: int = 0, minute: int = 0) -> transactions_pb2.Transaction:
    message = TS.Transaction(
        gid=gid,
        protocol=common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
        state=state,  # type: ignore[arg-type]
        outcome=TS.OUTCOME_PENDING,
        attempts=attempts,
        created_at=stamp(datetime(2026, 1, 1, 0, minute, tzinfo=UTC)),
    )
    branch = message.branches.add(branch="payment", participant="payments", state="prepared")
    branch.attempts.add(action="prepare", attempt=1, result="ok", at=stamp())
    return message


@pytest.fixture
def engines(world: World) -> World:
    world.transactions = {
        "t-prep": txn("t-prep", TS.TRANSACTION_STATE_PREPARING, minute=1),
        "t-commit": txn("t-commit", TS.TRANSACTION_STATE_COMMITTING, attempts=2, minute=2),
        "t-parked": txn("t-parked", TS.TRANSACTION_STATE_NEEDS_INTERVENTION, minute=3),
        "t-done": txn("t-done", TS.TRANSACTION_STATE_COMMITTED, minute=4),
    }
    world.sagas = {
        "s-run": txn("s-run", TS.TRANSACTION_STATE_RUNNING, minute=5),
        "s-comp": txn("s-comp", TS.TRANSACTION_STATE_COMPENSATING, minute=6),
        "s-parked": txn("s-parked", TS.TRANSACTION_STATE_NEEDS_INTERVENTION, minute=7),
        "s-done": txn("s-done", TS.TRANSACTION_STATE_COMPENSATED, minute=8),
    }
    for saga in world.sagas.values():
        saga.protocol = common_pb2.PROTOCOL_SAGA
    return world


@pytest.mark.parametrize(
    ("group", "gids"),
    [
        (
            None,
            ["s-done", "s-parked", "s-comp", "s-run", "t-done", "t-parked", "t-commit", "t-prep"],
        ),
        ("in_flight", ["s-run", "t-prep"]),
        ("in_doubt", ["s-comp", "t-commit"]),
        ("retrying", ["t-commit"]),
        ("needs_intervention", ["s-parked", "t-parked"]),
        ("done", ["s-done", "t-done"]),
    ],
)
async def test_transactions_by_state_group(
    client: httpx.AsyncClient, engines: World, group: str | None, gids: list[str]
) -> None:
    params = {"state": group} if group else {}
    response = await client.get("/v1/transactions", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [t["gid"] for t in body["transactions"]] == gids
    assert body["unavailable"] == []
    if group and group != "retrying":
        assert {t["group"] for t in body["transactions"]} == {group}


async def test_a_silent_engine_makes_the_list_partial_then_503(
    client: httpx.AsyncClient, engines: World
) -> None:
    engines.fail["saga"] = grpc.StatusCode.UNAVAILABLE
    response = await client.get("/v1/transactions", params={"state": "done"}, headers=ADMIN)
    assert response.json()["unavailable"] == ["saga"]
    assert [t["gid"] for t in response.json()["transactions"]] == ["t-done"]
    engines.fail["coordinator"] = grpc.StatusCode.DEADLINE_EXCEEDED
    response = await client.get("/v1/transactions", headers=ADMIN)
    assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"]


async def test_one_transaction_from_either_engine(
    client: httpx.AsyncClient, engines: World
) -> None:
    two_pc = (await client.get("/v1/transactions/t-commit", headers=ADMIN)).json()
    assert two_pc["kind"] == "2pc"
    assert two_pc["state"] == "committing"
    assert two_pc["group"] == "in_doubt"
    assert two_pc["retrying"] is True
    assert two_pc["branches"][0]["attempts"][0]["result"] == "ok"
    saga = (await client.get("/v1/transactions/s-comp", headers=ADMIN)).json()
    assert saga["kind"] == "saga"
    assert saga["protocol"] == "saga"
    assert_error(await client.get("/v1/transactions/nope", headers=ADMIN), 404, "not_found")
    assert_error(
        await client.get("/v1/transactions/bad%20gid", headers=ADMIN), 422, "invalid_request"
    )
    engines.fail["coordinator.Get"] = grpc.StatusCode.UNAVAILABLE
    assert_error(await client.get("/v1/transactions/s-comp", headers=ADMIN), 503, "unavailable")


async def test_interventions_name_the_admin_as_actor(
    client: httpx.AsyncClient, engines: World
) -> None:
    ops = bearer("admin", "ops-grace")
    retried = await client.post(
        "/v1/transactions/t-parked/retry", json={"reason": "payments fixed"}, headers=ops
    )
    assert retried.status_code == 200, retried.text
    aborted = await client.post(
        "/v1/transactions/s-run/abort", json={"reason": "customer asked"}, headers=ops
    )
    assert aborted.status_code == 200
    assert engines.interventions == [
        ("coordinator", "retry", "ops-grace", "payments fixed"),
        ("saga", "abort", "ops-grace", "customer asked"),
    ]
    refused = await client.post("/v1/transactions/t-done/retry", json={"reason": "x"}, headers=ops)
    assert_error(refused, 409, "failed_precondition")
    missing = await client.post("/v1/transactions/nope/abort", json={"reason": "x"}, headers=ops)
    assert_error(missing, 404, "not_found")  # never a saga tombstone for a typo
    assert_error(
        await client.post("/v1/transactions/t-parked/retry", json={"reason": " "}, headers=ops),
        422,
        "invalid_request",
        "body.reason",
    )


# -- operations, OpenAPI, metrics -------------------------------------------


async def test_health_readiness_and_metrics_need_no_token(
    client: httpx.AsyncClient, world: World
) -> None:
    assert (await client.get("/healthz")).json() == {"alive": True, "phase": "serving"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["backends"]["orders"] == "SERVING"
    await client.get("/v1/products/NOPE", headers=ADMIN)
    metrics = (await client.get("/metrics")).text
    assert (
        'dtx_http_requests_total{method="GET",route="/v1/products/{sku}",status="404"}' in metrics
    )
    assert 'dtx_http_request_seconds_count{method="GET",route="/v1/products/{sku}"}' in metrics


async def test_readiness_fails_with_the_runtime_checks(app: Any, client: httpx.AsyncClient) -> None:
    async def orders_down() -> None:
        raise ConnectionError("UNAVAILABLE")

    health: Health = app.state.health
    health.add_check("orders", orders_down)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert "orders" in response.json()["failures"]


async def test_openapi_documents_every_error_status(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "in_doubt" in spec["info"]["description"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            statuses = set(operation["responses"])
            if path.startswith("/v1/"):
                assert {"401", "422", "503"} <= statuses, (method, path)
                assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
                assert "Retry-After" in operation["responses"]["503"]["headers"]
            if method == "post" and path.startswith("/v1/"):
                assert "413" in statuses, (method, path)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path.startswith("/v1/"):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (method, path, status)
    assert "in_doubt" in spec["paths"]["/v1/transactions"]["get"]["description"]
    assert (await client.get("/docs")).status_code == 200


async def test_a_request_is_a_server_span_child_of_the_callers_trace() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dtx_gateway.middleware import TracingMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[Any] = []

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        seen.append(trace.get_current_span().get_span_context())  # what gRPC calls would carry
        scope["route"] = type("Route", (), {"path": "/v1/orders/{order_id}"})()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = TracingMiddleware(endpoint, tracer_provider=provider)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        await http.get(f"/v1/orders/{uuid.uuid4()}", headers=headers)
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /v1/orders/{order_id}"
    assert span.kind == trace.SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == caller_trace
    assert span.parent is not None
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/v1/orders/{order_id}"
    assert span.attributes["http.response.status_code"] == 404
    assert seen[0].span_id == span.context.span_id


def _tracing(app: Any) -> Callable[[], list[Any]]:
    return lambda: [m.cls.__name__ for m in app.user_middleware]


def test_tracing_middleware_is_installed(app: Any) -> None:
    names = _tracing(app)()
    assert names[0] in {"OpenTelemetryMiddleware", "TracingMiddleware"}
    assert names[1:] == ["MetricsMiddleware", "BodyLimitMiddleware"]
