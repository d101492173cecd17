"""Payments' rules, free of I/O: what a valid account and charge are, and why a charge is refused.

Every message names the field (``balance_minor: ...``) or the account, so a
caller or an operator reading a vote knows what to fix.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from dtx.v1 import participant_pb2, payments_pb2
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.participant import InvalidOperation

CURRENCY = re.compile(r"^[A-Z]{3}\Z")
MAX_OWNER_CHARS = 200
MAX_BALANCE_MINOR = 10**15
MAX_CHARGE_MINOR = 10**15
MAX_ORDER_ID_CHARS = 200


@dataclass(frozen=True)
class NewAccount:
    owner: str
    currency: str
    balance_minor: int


@dataclass(frozen=True)
class Charge:
    account_id: uuid.UUID
    amount_minor: int
    currency: str
    order_id: str


@dataclass(frozen=True)
class AccountState:
    """What a refused charge is explained from."""

    currency: str
    balance_minor: int


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """A UUID in its usual text form, or :class:`InvalidArgument` naming ``field``."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field}: {value[:80]!r} is not a UUID") from None


def validate_new_account(request: payments_pb2.CreateAccountRequest) -> NewAccount:
    owner = request.owner
    if not owner.strip():
        raise InvalidArgument("owner: must not be empty")
    if len(owner) > MAX_OWNER_CHARS:
        raise InvalidArgument(f"owner: at most {MAX_OWNER_CHARS} characters, got {len(owner)}")
    if not CURRENCY.match(request.currency):
        raise InvalidArgument(
            f"currency: {request.currency[:20]!r} must be three capital letters"
            " (ISO 4217, e.g. EUR)"
        )
    if request.balance_minor < 0:
        raise InvalidArgument(f"balance_minor: must not be negative, got {request.balance_minor}")
    if request.balance_minor > MAX_BALANCE_MINOR:
        raise InvalidArgument(
            f"balance_minor: at most {MAX_BALANCE_MINOR}, got {request.balance_minor}"
        )
    return NewAccount(owner, request.currency, request.balance_minor)


def parse_charge(operation: participant_pb2.BranchOperation) -> Charge:
    """The charge of a branch operation; :class:`InvalidOperation` names the bad field."""
    kind = operation.WhichOneof("kind")
    if kind != "charge":
        raise InvalidOperation(f"operation: payments accepts charge, got {kind or 'nothing'}")
    charge = operation.charge
    try:
        account_id = uuid.UUID(charge.account_id)
    except ValueError:
        raise InvalidOperation(
            f"charge.account_id: {charge.account_id[:80]!r} is not a UUID"
        ) from None
    if charge.amount_minor <= 0:
        raise InvalidOperation(f"charge.amount_minor: must be positive, got {charge.amount_minor}")
    if charge.amount_minor > MAX_CHARGE_MINOR:
        raise InvalidOperation(
            f"charge.amount_minor: at most {MAX_CHARGE_MINOR}, got {charge.amount_minor}"
        )
    if not CURRENCY.match(charge.currency):
        raise InvalidOperation(
            f"charge.currency: {charge.currency[:20]!r} must be three capital letters"
        )
    if len(charge.order_id) > MAX_ORDER_ID_CHARS:
        raise InvalidOperation(f"charge.order_id: at most {MAX_ORDER_ID_CHARS} characters")
    return Charge(account_id, charge.amount_minor, charge.currency, charge.order_id)


def refusal_reason(charge: Charge, account: AccountState | None) -> str:
    """Why the conditional debit matched no row, from the account as it is now."""
    if account is None:
        return f"unknown account {charge.account_id}"
    if account.currency != charge.currency:
        return f"currency mismatch: account is {account.currency}, charge is {charge.currency}"
    if account.balance_minor < charge.amount_minor:
        return (
            f"insufficient funds: account {charge.account_id} has {account.balance_minor},"
            f" needs {charge.amount_minor}"
        )
    # The debit's condition held when read again: only a concurrent change explains it.
    return f"account {charge.account_id} changed during the charge; retry"
