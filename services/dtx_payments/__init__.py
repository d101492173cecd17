"""Payments: the accounts and their money.

It owns the ``accounts`` (owner, ISO 4217 currency, balance in minor units,
never negative) and the append-only ``ledger`` of every movement (open,
charge, refund), so each balance equals the sum of its ledger rows. Its own
API (``dtx.v1.Payments``) opens and reads accounts; as a participant
(``dtx.v1.Participant``) it takes ``charge`` operations: a charge is one
conditional UPDATE inside the barrier's local transaction, a saga
compensation is a refund.

Where things are: ``handlers.py`` (gRPC API), ``participant.py`` (the
charge's ResourceManager), ``domain.py`` (pure rules), ``storage.py`` (SQL),
``migrations/`` (schema).
"""
