"""Gids and branch names: the alphabet that makes them safe inside SQL."""

from __future__ import annotations

import pytest

from dtx_runtime.identifiers import (
    InvalidIdentifier,
    check_branch,
    check_gid,
    parse_prepared_name,
    prepared_name,
    sql_literal,
)


def test_a_prepared_name_round_trips() -> None:
    name = prepared_name("order-1_A", "payment")
    assert name == "dtx:order-1_A:payment"
    assert parse_prepared_name(name) == ("order-1_A", "payment")


@pytest.mark.parametrize("gid", ["", "g 1", "g'1", "g\\1", "g:1", "g\n", "\ng", "x" * 101])
def test_a_gid_outside_the_alphabet_is_refused_by_name(gid: str) -> None:
    with pytest.raises(InvalidIdentifier, match=r"^gid "):
        check_gid(gid)


@pytest.mark.parametrize("branch", ["", "Pay", "a b", "a'", "a\n", "a:b", "x" * 41])
def test_a_branch_outside_the_alphabet_is_refused_by_name(branch: str) -> None:
    with pytest.raises(InvalidIdentifier, match=r"^branch "):
        check_branch(branch)


@pytest.mark.parametrize(
    "name", ["other:g:b", "dtx:g", "dtx:g:B", "dtx:g\n:b", "dtx:g:b\n", "dtx::b"]
)
def test_names_dtx_did_not_make_are_not_parsed(name: str) -> None:
    assert parse_prepared_name(name) is None


def test_checked_names_are_quoted_as_they_are() -> None:
    assert sql_literal("dtx:order-1_A:payment") == "'dtx:order-1_A:payment'"


@pytest.mark.parametrize("value", ["a'b", "a\\b", "a b", "a\n", "a;b", "a\x00"])
def test_anything_else_is_refused_for_quoting(value: str) -> None:
    with pytest.raises(ValueError, match="not a checked gid"):
        sql_literal(value)
