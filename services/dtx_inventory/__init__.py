"""Inventory: the products, their prices and their stock.

It owns ``products`` (SKU, name, unit price in minor units of the one
inventory currency, stock split into ``available`` and ``reserved``, neither
ever negative) and ``reservations`` (what each order holds, per SKU). Its own
API (``dtx.v1.Inventory``) creates, reads and restocks products; as a
participant (``dtx.v1.Participant``) it takes ``reserve`` operations: the
items' rows are locked in SKU order (no deadlock between two orders) and moved
from available to reserved in one statement; a saga compensation releases
them.

Where things are: ``handlers.py`` (gRPC API), ``participant.py`` (the
reservation's ResourceManager), ``domain.py`` (pure rules), ``storage.py``
(SQL), ``migrations/`` (schema).
"""
