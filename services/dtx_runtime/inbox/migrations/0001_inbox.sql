-- The inbox: the events a consumer has applied, recorded in the same local
-- transaction as their effect. A redelivered event conflicts on the key and
-- has no second effect. Rows are deleted after a retention period that must
-- exceed how long Kafka may redeliver (its retention).
CREATE TABLE dtx_inbox (
    consumer     text        NOT NULL CHECK (char_length(consumer) BETWEEN 1 AND 100),
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX dtx_inbox_processed_at ON dtx_inbox (processed_at);
