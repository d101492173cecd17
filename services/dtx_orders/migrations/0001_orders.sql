-- Orders. Items carry the unit price inventory stated when the order was
-- placed; the total is computed from them, never taken from the caller.
CREATE TABLE orders (
    id              uuid        PRIMARY KEY,
    account_id      uuid        NOT NULL,
    items           jsonb       NOT NULL CHECK (jsonb_typeof(items) = 'array'
                                                AND jsonb_array_length(items) BETWEEN 1 AND 50),
    total_minor     bigint      NOT NULL CHECK (total_minor >= 0),
    currency        char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    protocol        text        NOT NULL CHECK (protocol IN ('2pc', 'saga')),
    status          text        NOT NULL DEFAULT 'PENDING' CHECK (status IN (
                        'PENDING', 'CONFIRMED', 'REJECTED', 'FAILED', 'CANCELLED')),
    reason          text        NOT NULL DEFAULT '',
    -- The global transaction that settles the order (the id's hex).
    gid             text        NOT NULL UNIQUE,
    idempotency_key text        UNIQUE CHECK (char_length(idempotency_key) BETWEEN 1 AND 200),
    request_hash    text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- ListOrders: an account's orders, newest first.
CREATE INDEX orders_account_created ON orders (account_id, created_at DESC);

-- The reconciler: only the (few) orders still waiting for their transaction.
CREATE INDEX orders_pending_created ON orders (status, created_at) WHERE status = 'PENDING';
