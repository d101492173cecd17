"""The two-phase-commit coordinator.

It owns the durable transaction log (its own database) and drives every
global transaction to its logged decision: prepare all branches in parallel,
log the decision (presumed abort: no logged decision means abort), then commit
or abort every branch, retrying with backoff until each acknowledges or the
attempts run out and the transaction is parked for a person. Replicas share
the log and claim unfinished work with leases, so no leader is needed.

Where things are: ``handlers.py`` (gRPC), ``engine.py`` (the protocol),
``recovery.py`` (leases and the recovery loop), ``domain.py`` (pure rules),
``storage.py`` (the log's SQL), ``migrations/`` (its schema).
"""
