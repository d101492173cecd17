"""Orders: the orders and the global transactions that settle them.

It owns ``orders`` (account, items priced by inventory when the order was
placed, total in minor units, protocol, status, reason, the settling
transaction's gid, the idempotency key). Its API (``dtx.v1.Orders``) places an
order under a two-phase commit (coordinator) or a saga (orchestrator) across
payments, inventory and itself, and reads orders. As a participant
(``dtx.v1.Participant``) it takes ``confirm_order``: the order becomes
CONFIRMED in the same global transaction that charges and reserves. A
reconciler settles orders whose outcome PlaceOrder did not learn.

Where things are: ``handlers.py`` (gRPC API, translation only),
``placement.py`` (PlaceOrder's flow, and finishing a PENDING order, which the
reconciler shares), ``reconciler.py`` (the background settler), ``participant.py``
(confirm_order's ResourceManager), ``domain.py`` (validation, state machine,
pricing, outcomes), ``storage.py`` (SQL), ``metrics.py``, ``migrations/``.
"""
