"""Notifications: one message per order that reached its end, from the orders' events.

It consumes ``dtx.orders`` through the runtime's inbox (each event applied
once) and writes exactly one notification per terminal order (confirmed,
rejected, failed, cancelled): ``UNIQUE (order_id)`` keeps even two different
terminal events of one order from making two. ``dtx.v1.Notifications`` lists
an account's notifications; with ``DTX_NOTIFICATIONS_WEBHOOK_URL`` set, a
separate loop POSTs each one there with bounded retries and backoff, so a slow
or failing webhook never holds up consumption.

Where things are: ``consumer.py`` (the Kafka consumer), ``domain.py`` (which
events make a notification, and its text), ``storage.py`` (SQL),
``webhook.py`` (delivery), ``handlers.py`` (gRPC), ``migrations/``.
"""
