-- Products and the stock orders hold. Prices are integer minor units; stock is
-- whole units split into what is free (available) and what reservations hold.
CREATE TABLE products (
    sku         text        PRIMARY KEY CHECK (sku ~ '^[A-Z0-9][A-Z0-9-]{0,63}$'),
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price_minor bigint      NOT NULL CHECK (price_minor > 0),
    currency    char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    available   bigint      NOT NULL CHECK (available >= 0),
    reserved    bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- What one order holds of one SKU, and which branch of which global
-- transaction took it (a release finds its rows by that).
CREATE TABLE reservations (
    order_id   text        NOT NULL CHECK (order_id <> ''),
    sku        text        NOT NULL REFERENCES products (sku),
    quantity   bigint      NOT NULL CHECK (quantity > 0),
    gid        text        NOT NULL,
    branch     text        NOT NULL,
    status     text        NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'released')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);

CREATE INDEX reservations_branch ON reservations (gid, branch);
