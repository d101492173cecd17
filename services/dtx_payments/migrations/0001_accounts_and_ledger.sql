-- Accounts and their ledger. Money is an integer number of minor units
-- (cents); a balance can never go negative, whatever the code above does.
CREATE TABLE accounts (
    id            uuid        PRIMARY KEY,
    owner         text        NOT NULL CHECK (char_length(owner) BETWEEN 1 AND 200),
    currency      char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance_minor bigint      NOT NULL CHECK (balance_minor >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Every movement, append-only: the balance equals the sum of the account's
-- rows. A charge is negative, an opening balance or a refund positive.
CREATE TABLE ledger (
    id           bigserial   PRIMARY KEY,
    account_id   uuid        NOT NULL REFERENCES accounts (id),
    gid          text,
    branch       text,
    order_id     text,
    kind         text        NOT NULL CHECK (kind IN ('open', 'charge', 'refund')),
    amount_minor bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (kind = 'open' AND amount_minor >= 0 AND gid IS NULL)
        OR (kind = 'charge' AND amount_minor < 0 AND gid IS NOT NULL AND branch IS NOT NULL)
        OR (kind = 'refund' AND amount_minor > 0 AND gid IS NOT NULL AND branch IS NOT NULL)
    )
);

CREATE INDEX ledger_account ON ledger (account_id, id);

-- One charge and at most one refund per branch of a global transaction: a
-- second one would be a bug in the barrier, refused here as well.
CREATE UNIQUE INDEX ledger_branch_kind ON ledger (gid, branch, kind) WHERE gid IS NOT NULL;
