-- The barrier: one row per (gid, branch, op), written in the same local
-- transaction as the participant's effect, so every call is idempotent and
-- safe out of order.
--   op 'prepare'    outcome prepared | no | aborted   (aborted = an Abort came first)
--   op 'abort'      outcome aborted
--   op 'action'     outcome done | no | compensated   (compensated = a compensation came first)
--   op 'compensate' outcome done | noop
CREATE TABLE dtx_barrier (
    gid        text        NOT NULL,
    branch     text        NOT NULL,
    op         text        NOT NULL CHECK (op IN ('prepare', 'abort', 'action', 'compensate')),
    outcome    text        NOT NULL,
    reason     text        NOT NULL DEFAULT '',
    operation  bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gid, branch, op)
);

CREATE INDEX dtx_barrier_created_at ON dtx_barrier (created_at);
