-- The saga orchestrator's log. One row per saga; its steps (participant,
-- operation, state, reason, attempts) travel with it as JSON, so logging a
-- step's result is one UPDATE of one row.
CREATE TABLE sagas (
    gid             text        PRIMARY KEY,
    state           text        NOT NULL CHECK (state IN (
                        'RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED',
                        'NEEDS_INTERVENTION')),
    -- The way the saga is driven; kept while it is parked, so a retry knows it.
    direction       text        NOT NULL DEFAULT 'forward'
                        CHECK (direction IN ('forward', 'backward')),
    -- [{step, participant, operation (base64), state, reason, attempts}]; state is
    -- pending | done | refused | failed | compensated | skipped.
    steps           jsonb       NOT NULL,
    -- The step it is at: next to run (forward), next to compensate (backward), -1 none.
    current_step    integer     NOT NULL DEFAULT 0,
    -- The first failing step's "step: reason" once it turns back.
    reason          text        NOT NULL DEFAULT '',
    parked_reason   text        NOT NULL DEFAULT '',
    -- Rounds in the current direction that could not finish.
    attempts        integer     NOT NULL DEFAULT 0,
    timeout_ms      integer     NOT NULL,
    deadline        timestamptz NOT NULL,
    lease_owner     text,
    lease_expires   timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- What the recovery loop scans: only unfinished rows.
CREATE INDEX sagas_unfinished
    ON sagas (next_attempt_at)
    WHERE state IN ('RUNNING', 'COMPENSATING');

CREATE INDEX sagas_by_state ON sagas (state, created_at DESC);

-- Failed, refused or retried calls to a step's participant, for people looking at a saga.
CREATE TABLE saga_attempts (
    id      bigserial   PRIMARY KEY,
    gid     text        NOT NULL,
    step    text        NOT NULL,
    action  text        NOT NULL CHECK (action IN ('execute', 'compensate')),
    attempt integer     NOT NULL,
    result  text        NOT NULL,
    detail  text        NOT NULL DEFAULT '',
    at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX saga_attempts_gid ON saga_attempts (gid, id);

-- Manual interventions (retry, abort) with who, why and from which state.
CREATE TABLE interventions (
    id         bigserial   PRIMARY KEY,
    gid        text        NOT NULL,
    action     text        NOT NULL CHECK (action IN ('retry', 'abort')),
    actor      text        NOT NULL,
    reason     text        NOT NULL,
    from_state text        NOT NULL,
    to_state   text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX interventions_gid ON interventions (gid, id);
