"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Request validation answers **422** (``invalid_request``) with a message that
names the field (``body.items[0].quantity: ...``), whether FastAPI found the
problem or a backend did (gRPC INVALID_ARGUMENT). Anything the client can fix
is a 4xx; a 5xx means the gateway or a backend could not answer, and 503 and
429 carry ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dtx_gateway.schemas import ErrorResponse

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error response: HTTP status, a stable machine-readable code and a message for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def describe_validation(errors: Sequence[Any]) -> str:
    """``body.items[0].quantity: Input should be greater than or equal to 1; ...``"""
    parts = []
    for error in errors[:10]:
        location = ""
        for item in error.get("loc", ()):
            location += (
                f"[{item}]" if isinstance(item, int) else (f".{item}" if location else str(item))
            )
        parts.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def install_handlers(app: FastAPI) -> None:
    """Make every error, FastAPI's own included, answer in the one shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8, say): one status
            # for every invalid request.
            return error_response(
                422, "invalid_request", f"body: cannot be parsed as JSON ({exc.detail})"
            )
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the gateway's log")


def _doc(description: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        doc["headers"] = {
            name: {"description": text, "schema": {"type": "string"}, "required": True}
            for name, text in headers.items()
        }
    return doc


RETRY_AFTER = {"Retry-After": "Seconds to wait before trying again."}

ERROR_DOCS: dict[int, dict[str, Any]] = {
    401: _doc(
        "No bearer token, or one that is malformed, badly signed or expired.",
        {"WWW-Authenticate": "Always `Bearer`."},
    ),
    403: _doc("The token is valid but its role may not use this operation."),
    404: _doc(
        "Not found — also what a customer gets for another customer's account, order"
        " or notifications, so their existence is not revealed."
    ),
    409: _doc(
        "Conflicts with the current state: the object exists already, the Idempotency-Key"
        " was used for another request, or the transaction is in a state that refuses"
        " this intervention."
    ),
    413: _doc("The request body is larger than the gateway accepts (64 KiB by default)."),
    422: _doc(
        "The request is invalid (malformed JSON, a missing or out-of-range field, an"
        " unknown field); the message names the field."
    ),
    429: _doc("A backend is over capacity.", RETRY_AFTER),
    500: _doc("An unexpected error in the gateway."),
    502: _doc("A backend answered with an internal error."),
    503: _doc("A backend is down or did not answer in time.", RETRY_AFTER),
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of an operation."""
    return {status: ERROR_DOCS[status] for status in statuses}


AUTHENTICATED = (401, 403, 422, 429, 500, 502, 503)
"""What any authenticated operation may answer besides its own successes."""
