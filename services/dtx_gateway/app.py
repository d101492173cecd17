"""The FastAPI application: routes, error shape, middleware, OpenAPI."""

from __future__ import annotations

from fastapi import FastAPI

from dtx_gateway import convert
from dtx_gateway.backends import Backends
from dtx_gateway.errors import install_handlers
from dtx_gateway.middleware import BodyLimitMiddleware, MetricsMiddleware, tracing_middleware
from dtx_gateway.routes import accounts, ops, orders, products, transactions
from dtx_runtime.health import Health

DESCRIPTION = f"""\
REST in front of the dtx services: accounts (payments), products (inventory),
orders (placed under a two-phase commit or a saga), notifications, and the
global transactions of the 2PC coordinator and the saga orchestrator.

**Authentication.** `Authorization: Bearer <JWT>`, HS256, claims `sub`, `role`
(`customer` or `admin`) and `exp`. Missing, malformed, badly signed or expired:
401 with `WWW-Authenticate: Bearer`. A valid token on an operation its role may
not use: 403. A customer's `sub` is their account id; another customer's
account, orders or notifications answer 404, exactly like ones that do not exist.

**Money** is an integer in minor units of its currency (cents).

**Errors** always have the shape `{{"error": {{"code": "...", "message": "..."}}}}`;
the message names the field at fault. Invalid requests (malformed JSON, missing,
unknown or out-of-range fields, a missing Idempotency-Key) are **422**
`invalid_request`. Backend statuses map as: INVALID_ARGUMENT → 422, NOT_FOUND →
404, ALREADY_EXISTS and FAILED_PRECONDITION → 409, RESOURCE_EXHAUSTED → 429,
UNAVAILABLE and DEADLINE_EXCEEDED (or a backend that is down) → 503; 429 and 503
carry `Retry-After`. Bodies over the limit (64 KiB by default) → 413.

{convert.STATE_GROUPS_DOC}"""


def create_app(
    *,
    jwt_secret: str,
    backends: Backends,
    health: Health,
    max_body_bytes: int = 64 * 1024,
) -> FastAPI:
    """The gateway app over ``backends``; ``health`` is the service's readiness state."""
    app = FastAPI(
        title="dtx gateway",
        version="1.0.0",
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.jwt_secret = jwt_secret
    app.state.backends = backends
    app.state.health = health
    install_handlers(app)
    for router in (
        accounts.router,
        products.router,
        orders.router,
        transactions.router,
        ops.router,
    ):
        app.include_router(router)
    # The last added runs first: a span around everything, metrics around what it saw.
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(tracing_middleware())
    return app
