-- The ledger: exactly one entry per charge, written by the LedgerConsumer in
-- the same transaction as its inbox row and the settling of the
-- `charge.created` event (docs/ARCHITECTURE.md). The primary key is the last line of
-- defence: a second entry for a charge cannot exist.

CREATE TABLE ledger_entries (
    charge_id     uuid PRIMARY KEY REFERENCES charges (id),
    event_id      uuid NOT NULL,
    user_id       text NOT NULL,
    amount_cents  bigint NOT NULL,
    currency      text NOT NULL,
    applied_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_user_id ON ledger_entries (user_id);
