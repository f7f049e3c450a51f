-- Charges: the payment path. The ledger (applied exactly once per charge)
-- arrives with the LedgerConsumer; until then every charge is 'pending'.

CREATE TABLE charges (
    id            uuid PRIMARY KEY,
    user_id       text NOT NULL,
    amount_cents  bigint NOT NULL CHECK (amount_cents > 0 AND amount_cents <= 1000000000),
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    description   text NOT NULL,
    ledger_status text NOT NULL DEFAULT 'pending'
                  CHECK (ledger_status IN ('pending', 'applied', 'dead')),
    created_at    timestamptz NOT NULL
);
CREATE INDEX charges_user_id ON charges (user_id);
