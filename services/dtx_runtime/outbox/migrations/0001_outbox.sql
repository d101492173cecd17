-- The transactional outbox: one row per domain event, inserted in the same
-- local transaction as the state change it reports (for a two-phase commit,
-- inside the prepared transaction, so the row exists exactly when the branch
-- commits). The relay publishes unsent rows to Kafka in `seq` order and then
-- sets `sent_at`; sent rows are deleted after a retention period.
CREATE TABLE dtx_outbox (
    id         uuid        PRIMARY KEY,
    -- Insertion order. Two events of one aggregate are written by transactions
    -- that hold the aggregate's row in turn, so their seq order is their order.
    seq        bigint      GENERATED ALWAYS AS IDENTITY,
    topic      text        NOT NULL CHECK (char_length(topic) BETWEEN 1 AND 200),
    -- The Kafka key: the aggregate id (an order's id).
    key        text        NOT NULL CHECK (char_length(key) BETWEEN 1 AND 200),
    type       text        NOT NULL CHECK (char_length(type) BETWEEN 1 AND 100),
    -- A serialized dtx.v1.Event.
    payload    bytea       NOT NULL,
    -- The W3C trace context of the writing transaction (traceparent, tracestate).
    headers    jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at    timestamptz
);

-- The relay's scan: only the (few) rows still to publish, in order.
CREATE INDEX dtx_outbox_unsent ON dtx_outbox (seq) WHERE sent_at IS NULL;

-- Retention of what was published.
CREATE INDEX dtx_outbox_sent_at ON dtx_outbox (sent_at) WHERE sent_at IS NOT NULL;
