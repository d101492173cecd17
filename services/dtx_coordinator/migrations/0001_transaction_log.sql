-- The coordinator's durable log. One row per global transaction; its branches
-- (participant, operation, state) travel with it as JSON so the hot path is one
-- INSERT and two UPDATEs.
CREATE TABLE global_transactions (
    gid             text        PRIMARY KEY,
    state           text        NOT NULL CHECK (state IN (
                        'PREPARING', 'COMMITTING', 'ABORTING',
                        'COMMITTED', 'ABORTED', 'NEEDS_INTERVENTION')),
    -- Written (durably) before phase two; NULL means no decision = abort.
    decision        text        CHECK (decision IN ('commit', 'abort')),
    reason          text        NOT NULL DEFAULT '',
    branches        jsonb       NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    deadline        timestamptz NOT NULL,
    lease_owner     text,
    lease_expires   timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz,
    finished_at     timestamptz
);

-- What the recovery loop scans: only unfinished rows.
CREATE INDEX global_transactions_unfinished
    ON global_transactions (next_attempt_at)
    WHERE state IN ('PREPARING', 'COMMITTING', 'ABORTING');

CREATE INDEX global_transactions_by_state ON global_transactions (state, created_at DESC);

-- Failed or retried calls to a branch, for people looking at a stuck transaction.
CREATE TABLE branch_attempts (
    id      bigserial   PRIMARY KEY,
    gid     text        NOT NULL,
    branch  text        NOT NULL,
    action  text        NOT NULL,
    attempt integer     NOT NULL,
    result  text        NOT NULL,
    detail  text        NOT NULL DEFAULT '',
    at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX branch_attempts_gid ON branch_attempts (gid, id);

-- Manual interventions (retry, abort) with who and why.
CREATE TABLE interventions (
    id     bigserial   PRIMARY KEY,
    gid    text        NOT NULL,
    action text        NOT NULL CHECK (action IN ('retry', 'abort')),
    actor  text        NOT NULL,
    reason text        NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
