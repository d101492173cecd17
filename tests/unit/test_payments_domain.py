"""Payments' pure rules: account and charge validation, refusal reasons."""

from __future__ import annotations

import uuid

import pytest

from dtx.v1 import participant_pb2, payments_pb2
from dtx_payments import domain
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.participant import InvalidOperation

pytestmark = pytest.mark.unit

ACCOUNT = uuid.UUID("6f1f8e4e-4b7e-4c59-9a53-0d5f0b2f6f1a")


def account_request(**overrides: object) -> payments_pb2.CreateAccountRequest:
    fields: dict[str, object] = {"owner": "Ada", "currency": "EUR", "balance_minor": 1000}
    fields.update(overrides)
    return payments_pb2.CreateAccountRequest(**fields)  # type: ignore[arg-type]


def charge_op(**overrides: object) -> participant_pb2.BranchOperation:
    fields: dict[str, object] = {
        "account_id": str(ACCOUNT),
        "amount_minor": 250,
        "currency": "EUR",
        "order_id": "o-1",
    }
    fields.update(overrides)
    return participant_pb2.BranchOperation(charge=participant_pb2.ChargeOperation(**fields))  # type: ignore[arg-type]


def test_valid_account() -> None:
    assert domain.validate_new_account(account_request()) == domain.NewAccount("Ada", "EUR", 1000)


def test_zero_and_maximum_balances_are_fine() -> None:
    assert domain.validate_new_account(account_request(balance_minor=0)).balance_minor == 0
    top = domain.MAX_BALANCE_MINOR
    assert domain.validate_new_account(account_request(balance_minor=top)).balance_minor == top


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"owner": ""}, "owner:"),
        ({"owner": "   "}, "owner:"),
        ({"owner": "x" * 201}, "owner:"),
        ({"currency": "eur"}, "currency:"),
        ({"currency": "EURO"}, "currency:"),
        ({"currency": ""}, "currency:"),
        ({"currency": "EUR\n"}, "currency:"),
        ({"balance_minor": -1}, "balance_minor:"),
        ({"balance_minor": 10**15 + 1}, "balance_minor:"),
    ],
)
def test_bad_account_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^{field}"):
        domain.validate_new_account(account_request(**overrides))


def test_owner_of_200_characters_is_fine() -> None:
    assert domain.validate_new_account(account_request(owner="x" * 200)).owner == "x" * 200


def test_parse_uuid_names_the_field() -> None:
    assert domain.parse_uuid(str(ACCOUNT), "account_id") == ACCOUNT
    with pytest.raises(InvalidArgument, match=r"^account_id: 'nope' is not a UUID"):
        domain.parse_uuid("nope", "account_id")


def test_valid_charge() -> None:
    assert domain.parse_charge(charge_op()) == domain.Charge(ACCOUNT, 250, "EUR", "o-1")


def test_charge_of_another_kind_is_refused() -> None:
    reserve = participant_pb2.BranchOperation(
        reserve=participant_pb2.ReserveOperation(order_id="o")
    )
    with pytest.raises(
        InvalidOperation, match=r"^operation: payments accepts charge, got reserve$"
    ):
        domain.parse_charge(reserve)
    with pytest.raises(InvalidOperation, match="got nothing"):
        domain.parse_charge(participant_pb2.BranchOperation())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"amount_minor": 0}, "charge.amount_minor:"),
        ({"amount_minor": -5}, "charge.amount_minor:"),
        ({"account_id": "x"}, "charge.account_id:"),
        ({"account_id": ""}, "charge.account_id:"),
        ({"currency": "usd"}, "charge.currency:"),
    ],
)
def test_bad_charge_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidOperation, match=rf"^{field}"):
        domain.parse_charge(charge_op(**overrides))


def test_refusal_reasons() -> None:
    charge = domain.parse_charge(charge_op())
    assert domain.refusal_reason(charge, None) == f"unknown account {ACCOUNT}"
    assert (
        domain.refusal_reason(charge, domain.AccountState("USD", 10_000))
        == "currency mismatch: account is USD, charge is EUR"
    )
    assert (
        domain.refusal_reason(charge, domain.AccountState("EUR", 100))
        == f"insufficient funds: account {ACCOUNT} has 100, needs 250"
    )
