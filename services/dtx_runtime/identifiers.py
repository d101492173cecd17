"""Global transaction ids and branch names: their shape, and the names derived from them.

The gid ends up inside SQL (``PREPARE TRANSACTION 'dtx:<gid>:<branch>'`` takes
no bind parameters), so its alphabet is restricted here, once, for every
service: a gid that passes :func:`check_gid` is safe to quote.
"""

from __future__ import annotations

import re

GID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}\Z")
BRANCH_PATTERN = re.compile(r"^[a-z0-9_-]{1,40}\Z")
PREPARED_PREFIX = "dtx:"
# What sql_literal quotes: the union of both alphabets and the prepared name's ':'.
_QUOTABLE = re.compile(r"[A-Za-z0-9_:-]*\Z")


class InvalidIdentifier(ValueError):
    """A gid or branch name of the wrong shape; the message names the field."""


def check_gid(gid: str) -> str:
    if not GID_PATTERN.match(gid):
        raise InvalidIdentifier(f"gid {gid[:120]!r} must match [A-Za-z0-9_-]{{1,100}}")
    return gid


def check_branch(branch: str) -> str:
    if not BRANCH_PATTERN.match(branch):
        raise InvalidIdentifier(f"branch {branch[:60]!r} must match [a-z0-9_-]{{1,40}}")
    return branch


def prepared_name(gid: str, branch: str) -> str:
    """The PostgreSQL prepared-transaction id of a branch: ``dtx:<gid>:<branch>``."""
    return f"{PREPARED_PREFIX}{check_gid(gid)}:{check_branch(branch)}"


def sql_literal(value: str) -> str:
    """A checked gid, branch or prepared name as an SQL string literal.

    For SQL that takes no bind parameters. Only the identifiers' alphabet is
    accepted, so no quoting rule (nor ``standard_conforming_strings``) can
    matter; anything else reaching here is a bug, refused.
    """
    if not _QUOTABLE.match(value):
        raise ValueError(f"not a checked gid, branch or prepared name: {value!r}")
    return f"'{value}'"


def parse_prepared_name(name: str) -> tuple[str, str] | None:
    """The (gid, branch) of a prepared transaction dtx made, or None for anyone else's."""
    if not name.startswith(PREPARED_PREFIX):
        return None
    rest = name[len(PREPARED_PREFIX) :]
    gid, sep, branch = rest.rpartition(":")
    if not sep or not GID_PATTERN.match(gid) or not BRANCH_PATTERN.match(branch):
        return None
    return gid, branch
