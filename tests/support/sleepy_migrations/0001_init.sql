-- The test-only "sleepy" service: one row per call it answered.
CREATE TABLE sleepy_calls (
    id          bigserial PRIMARY KEY,
    account_id  text NOT NULL,
    answered_at timestamptz NOT NULL DEFAULT now()
);
