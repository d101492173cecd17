-- One notification per order that reached a terminal status. The inbox
-- (dtx_inbox) makes each event count once; UNIQUE (order_id) makes each order
-- count once, even when two different terminal events arrive for it.
CREATE TABLE notifications (
    id              uuid        PRIMARY KEY,
    order_id        uuid        NOT NULL UNIQUE,
    account_id      uuid        NOT NULL,
    -- The event that caused it.
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL CHECK (event_type IN (
                        'order.confirmed', 'order.rejected', 'order.failed', 'order.cancelled')),
    message         text        NOT NULL CHECK (char_length(message) BETWEEN 1 AND 2000),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Webhook delivery: set once the webhook answered 2xx.
    delivered_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- When to try next; NULL once delivered or given up.
    next_attempt_at timestamptz DEFAULT now(),
    last_error      text
);

-- ListNotifications: an account's notifications, newest first.
CREATE INDEX notifications_account_created ON notifications (account_id, created_at DESC, id DESC);

-- The delivery loop: only what is still to deliver.
CREATE INDEX notifications_to_deliver ON notifications (next_attempt_at)
    WHERE delivered_at IS NULL AND next_attempt_at IS NOT NULL;
