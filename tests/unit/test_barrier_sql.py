"""The barrier's one-round-trip opening statement quotes only checked names."""

from __future__ import annotations

import pytest

from dtx_runtime.participant.barrier import _literal


def test_checked_names_are_quoted_as_they_are() -> None:
    assert _literal("dtx:order-1_A:payment") == "'dtx:order-1_A:payment'"


@pytest.mark.parametrize("value", ["a'b", "a\\b", "a b", "a\n", "a;b", "a\x00"])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not a checked gid"):
        _literal(value)
