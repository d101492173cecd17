"""Inventory's SQL: functions over a connection.

A reservation is one statement for all its items. The product rows are
locked in SKU order first (``ORDER BY sku FOR UPDATE``), and every update
joins those locked rows, so two orders sharing SKUs always lock them in the
same order and never deadlock. The statement reports, per item, what was
available, so the refusal reason comes from the same locked read; it also
writes the ``stock.reserved`` outbox row when every item is held, so the hot
path of a prepare is one round trip besides the barrier's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx_inventory.domain import Line, NewProduct, Reservation
from dtx_runtime.outbox import OUTBOX_COLUMNS, outbox_params

Conn = asyncpg.Connection | PoolConnectionProxy

_PRODUCT_COLUMNS = "sku, name, price_minor, currency, available, reserved"

_RESERVE = f"""
WITH wanted AS (
    SELECT sku, quantity, price
    FROM unnest($1::text[], $2::bigint[], $6::bigint[]) AS w (sku, quantity, price)
), locked AS (
    SELECT p.sku, p.available, p.price_minor FROM products p
    WHERE p.sku = ANY ($1::text[])
    ORDER BY p.sku
    FOR UPDATE
), enough AS (
    SELECT w.sku, w.quantity FROM wanted w JOIN locked l USING (sku)
    WHERE l.available >= w.quantity
      -- The price the order was priced at (when given) must still be the price.
      AND (w.price IS NULL OR w.price = l.price_minor)
), moved AS (
    UPDATE products p
    SET available = p.available - e.quantity, reserved = p.reserved + e.quantity,
        updated_at = now()
    FROM enough e
    WHERE p.sku = e.sku
      -- All or nothing: when one item does not fit, the others are not moved either.
      AND (SELECT count(*) FROM enough) = cardinality($1::text[])
    RETURNING p.sku, e.quantity
), held AS (
    INSERT INTO reservations (order_id, sku, quantity, gid, branch)
    SELECT $3, m.sku, m.quantity, $4, $5 FROM moved m
    ON CONFLICT (order_id, sku) DO NOTHING
    RETURNING sku
), event AS (
    INSERT INTO dtx_outbox ({OUTBOX_COLUMNS}) SELECT {outbox_params(7)}
    WHERE (SELECT count(*) FROM held) = cardinality($1::text[])
)
SELECT w.sku, w.quantity, l.available, l.price_minor, h.sku IS NOT NULL AS held
FROM wanted w
LEFT JOIN locked l USING (sku)
LEFT JOIN held h USING (sku)
ORDER BY w.sku
"""

_RELEASE = """
WITH mine AS (
    SELECT sku, quantity FROM reservations
    WHERE gid = $1 AND branch = $2 AND status = 'held'
), locked AS (
    SELECT p.sku FROM products p
    WHERE p.sku IN (SELECT sku FROM mine)
    ORDER BY p.sku
    FOR UPDATE
), released AS (
    UPDATE reservations SET status = 'released', updated_at = now()
    WHERE gid = $1 AND branch = $2 AND status = 'held'
    RETURNING sku, quantity
)
UPDATE products p
SET available = p.available + r.quantity, reserved = p.reserved - r.quantity,
    updated_at = now()
FROM released r JOIN locked l USING (sku)
WHERE p.sku = r.sku
RETURNING p.sku, r.quantity
"""


@dataclass(frozen=True)
class ReservedItem:
    """One item of a reservation attempt as the statement saw it."""

    sku: str
    quantity: int
    available: int | None  # None: no such product
    held: bool
    price_minor: int | None = None  # the product's unit price now (None: no such product)


async def create_product(conn: Conn, new: NewProduct, currency: str) -> asyncpg.Record | None:
    """The new product, or None when the SKU exists."""
    return await conn.fetchrow(
        "INSERT INTO products (sku, name, price_minor, currency, available)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sku) DO NOTHING"
        f" RETURNING {_PRODUCT_COLUMNS}",
        new.sku,
        new.name,
        new.price_minor,
        currency,
        new.stock,
    )


async def get_product(conn: Conn, sku: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)


async def get_products(conn: Conn, skus: Sequence[str]) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = ANY ($1::text[]) ORDER BY sku",
        list(skus),
    )


async def restock(conn: Conn, line: Line) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "UPDATE products SET available = available + $2, updated_at = now() WHERE sku = $1"
        f" RETURNING {_PRODUCT_COLUMNS}",
        line.sku,
        line.quantity,
    )


async def reserve(
    conn: Conn, gid: str, branch: str, reservation: Reservation, event: Sequence[object]
) -> list[ReservedItem]:
    """Move every item from available to reserved, or none; report each item either way.

    ``event`` (:func:`~dtx_runtime.outbox.outbox_values`) is written only when
    every item is held.
    """
    rows = await conn.fetch(
        _RESERVE,
        reservation.skus,
        reservation.quantities,
        reservation.order_id,
        gid,
        branch,
        reservation.prices,
        *event,
    )
    return [
        ReservedItem(r["sku"], r["quantity"], r["available"], r["held"], r["price_minor"])
        for r in rows
    ]


async def release(conn: Conn, gid: str, branch: str) -> list[Line]:
    """Give back what the branch holds; what was released."""
    rows = await conn.fetch(_RELEASE, gid, branch)
    return [Line(r["sku"], r["quantity"]) for r in rows]
