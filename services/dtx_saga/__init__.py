"""The saga orchestrator (``dtx.v1.SagaOrchestrator``).

It owns the saga log (its own database) and drives every saga to its end:
steps run forward in order, each ``Execute`` logged as it answers; when a step
refuses, keeps failing or the deadline passes, the steps that ran (or may
have) are compensated in reverse — up to the last step, the pivot: once the
steps before it are done the saga only goes forward (see ``engine``). Work that cannot finish is parked as
NEEDS_INTERVENTION for a person, never retried in a silent loop. Replicas
share the log and claim unfinished sagas with leases, as the coordinator's
replicas do, so no leader is needed and a restarted process resumes every
saga where it was.

Where things are: ``handlers.py`` (gRPC), ``engine.py`` (the protocol, and
when a saga turns back or is parked), ``recovery.py`` (leases and the
recovery loop), ``domain.py`` (pure rules: which steps to compensate, step
states), ``storage.py`` (the log's SQL and which writes are durable),
``metrics.py``, ``migrations/``.

Shared with the coordinator through ``dtx_runtime.coordination`` rather than
copied: bounded participant calls, the transaction metric families
(``protocol="saga"``), the ``Attempt`` record, the audit-field check and lease
owners; the settings are the coordinator's, subclassed.
"""
