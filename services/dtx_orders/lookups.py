"""What orders remembers of other services' answers, so that most orders ask nothing first.

An order needs the account's currency (from payments) and the items' unit
prices (from inventory) before its transaction starts. Asking for them is a
round trip on every order's critical path, so both are kept here:

* an account's currency never changes (payments has no call that changes
  it): kept until evicted;
* a price may change, so a remembered one is used for a bounded time only, and
  the order sends the prices it was priced at with its reservation: inventory
  votes no when a price differs, so a stale entry can reject an order but never
  charge a wrong amount. The entries of a refused order are dropped, so the
  next order asks again.

Both are bounded; the oldest entry leaves first. An account or SKU not seen
yet is looked up, so an unknown one is still NOT_FOUND.

A third memory spares the round trip after the transaction: the row the
order's own confirmation wrote (:class:`ConfirmedRows`). It is taken only
once the order is known CONFIRMED — its branch committed — and CONFIRMED is
final, so that row is the order as it stands.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

import asyncpg

from dtx_orders.domain import Price

K = TypeVar("K")
V = TypeVar("V")


class _Bounded(Generic[K, V]):
    """A dict of at most ``capacity`` entries; inserting past it evicts the oldest."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        if key not in self._entries and len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = value

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)


class AccountCurrencies:
    """Accounts' currencies as payments gave them."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._known: _Bounded[uuid.UUID, str] = _Bounded(capacity)

    def get(self, account_id: uuid.UUID) -> str | None:
        return self._known.get(account_id)

    def put(self, account_id: uuid.UUID, currency: str) -> None:
        self._known.put(account_id, currency)


class ProductPrices:
    """Unit prices as inventory gave them, each trusted for ``ttl_s`` seconds (0: never)."""

    def __init__(
        self,
        ttl_s: float,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._known: _Bounded[str, tuple[float, Price]] = _Bounded(capacity)

    def get_all(self, skus: Iterable[str]) -> dict[str, Price] | None:
        """The prices of every SKU, or None when one is unknown or too old."""
        now = self._clock()
        found = {}
        for sku in skus:
            entry = self._known.get(sku)
            if entry is None or now - entry[0] >= self._ttl_s:
                return None
            found[sku] = entry[1]
        return found

    def put_all(self, prices: Mapping[str, Price]) -> None:
        if self._ttl_s <= 0:
            return
        now = self._clock()
        for sku, price in prices.items():
            self._known.put(sku, (now, price))

    def forget(self, skus: Iterable[str]) -> None:
        for sku in skus:
            self._known.discard(sku)


class ConfirmedRows:
    """The rows confirmations in this process wrote, by gid, each taken at most once.

    Put when the confirmation runs (for a two-phase commit: before its branch
    commits); taken by the order's own request after its transaction, whatever
    the outcome, and used only when the order is CONFIRMED. Entries nobody
    takes (a confirmation driven by recovery, or whose request was answered by
    another replica or gave up) are evicted oldest first.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._rows: _Bounded[str, asyncpg.Record] = _Bounded(capacity)

    def put(self, gid: str, row: asyncpg.Record) -> None:
        self._rows.put(gid, row)

    def take(self, gid: str) -> asyncpg.Record | None:
        row = self._rows.get(gid)
        self._rows.discard(gid)
        return row
