"""Bearer tokens: HS256 JWTs with ``sub``, ``role`` and ``exp``, minted and verified here.

A customer's ``sub`` is their account id: the gateway lets a customer read and
order for that account only. An admin's ``sub`` names the person, and becomes
the ``actor`` of a manual intervention in the audit log.

Only HS256 is accepted (never ``none`` or an algorithm chosen by the token),
``exp`` is required, and a token with an unknown role is invalid rather than
merely unprivileged.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import jwt

from dtx_gateway.config import check_secret

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("sub", "role", "exp")
MAX_SUB_CHARS = 200
LEEWAY_SECONDS = 5
"""Clock skew tolerated on ``exp`` and ``nbf`` between the minting host and the gateway."""


class Role(enum.StrEnum):
    CUSTOMER = "customer"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    sub: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, account_id: str) -> bool:
        """A customer owns the account whose id is their ``sub`` (compared case-insensitively, as UUIDs are)."""
        return self.role is Role.CUSTOMER and self.sub.lower() == account_id.lower()


class AuthError(Exception):
    """A token that proves nothing: missing, malformed, badly signed, expired or incomplete.

    The message says which, without echoing the token.
    """


def mint_token(secret: str, role: str, sub: str, ttl_s: float) -> str:
    """A signed token for ``sub`` in ``role``, valid for ``ttl_s`` seconds from now.

    A negative ``ttl_s`` mints an already expired token (for tests); zero is refused.
    """
    check_secret(secret)
    try:
        checked_role = Role(role)
    except ValueError:
        raise ValueError(
            f"role: {role!r} is not one of {', '.join(r.value for r in Role)}"
        ) from None
    if not sub or len(sub) > MAX_SUB_CHARS:
        raise ValueError(f"sub: must be 1 to {MAX_SUB_CHARS} characters")
    if ttl_s == 0:
        raise ValueError("ttl_s: must not be zero")
    now = int(time.time())
    claims = {"sub": sub, "role": checked_role.value, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str, *, leeway_s: float = LEEWAY_SECONDS) -> Principal:
    """The principal of a valid token, or :class:`AuthError` saying what is wrong with it."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=leeway_s,
            options={"require": list(REQUIRED_CLAIMS), "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(f"token is not signed with {ALGORITHM}") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("token is not valid yet") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"malformed token: {exc}") from None
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_CHARS:
        raise AuthError(f"token 'sub' claim must be a string of 1 to {MAX_SUB_CHARS} characters")
    if not isinstance(role, str) or role not in Role._value2member_map_:
        raise AuthError(f"token 'role' claim must be one of {', '.join(r.value for r in Role)}")
    return Principal(sub, Role(role))
