"""FastAPI dependencies: who is calling (from the bearer token) and the backends."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dtx_gateway.auth import AuthError, Principal, verify_token
from dtx_gateway.backends import Backends
from dtx_gateway.errors import forbidden, not_found, unauthorized

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="HS256 JWT with `sub`, `role` (customer or admin) and `exp`. A customer's"
    " `sub` is their account id.",
)


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller of a valid token; 401 with ``WWW-Authenticate: Bearer`` otherwise."""
    if credentials is None:
        raise unauthorized("missing bearer token: send 'Authorization: Bearer <JWT>'")
    secret: str = request.app.state.jwt_secret
    try:
        return verify_token(credentials.credentials, secret)
    except AuthError as exc:
        raise unauthorized(str(exc)) from None


Caller = Annotated[Principal, Depends(principal)]


def admin(caller: Caller) -> Principal:
    """An admin; a valid customer token is 403."""
    if not caller.is_admin:
        raise forbidden("this operation needs the admin role")
    return caller


Admin = Annotated[Principal, Depends(admin)]


def backends(request: Request) -> Backends:
    found: Backends = request.app.state.backends
    return found


Remote = Annotated[Backends, Depends(backends)]


def check_account_access(caller: Principal, account_id: str, what: str = "account") -> None:
    """An admin, or the customer who owns the account; anyone else gets the same 404 as for
    an account that does not exist, so another customer's data is not even confirmed."""
    if not caller.is_admin and not caller.owns(account_id):
        raise not_found(f"{what} {account_id} not found")
