-- The embedded backend's schema: the same tables as migrations/postgres,
-- written for SQLite.
--
-- - UUIDs are stored as their hyphenated text (UUIDv7 text sorts in time
--   order, like Postgres' uuid type).
-- - Instants are INTEGER microseconds since the Unix epoch, bound from Rust,
--   so comparisons never depend on SQLite's date functions or text formats.
-- - SQLite has no row locks and no SKIP LOCKED: one process writes, one write
--   transaction at a time (BEGIN IMMEDIATE), and a consumer holds an outbox
--   row with a lease (`locked_by`, `locked_until`) instead of a lock, so no
--   transaction stays open while an email is being sent.

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,            -- UUIDv7: time-ordered, the list cursor
    title       TEXT NOT NULL,
    company     TEXT NOT NULL,
    location    TEXT NOT NULL,
    description TEXT NOT NULL,
    posted_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE applications (
    id           TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL REFERENCES jobs (id),
    user_id      TEXT NOT NULL,
    email        TEXT NOT NULL,
    resume_url   TEXT,
    cover_letter TEXT,
    email_status TEXT NOT NULL DEFAULT 'pending'
                 CHECK (email_status IN ('pending', 'sent', 'dead')),
    created_at   INTEGER NOT NULL,
    UNIQUE (user_id, job_id)                 -- one application per user and job, whatever the keys
) STRICT;

CREATE TABLE charges (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL CHECK (amount_cents > 0 AND amount_cents <= 1000000000),
    currency      TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency)),
    description   TEXT NOT NULL,
    ledger_status TEXT NOT NULL DEFAULT 'pending'
                  CHECK (ledger_status IN ('pending', 'applied', 'dead')),
    created_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX charges_user_id ON charges (user_id);

CREATE TABLE idempotency_keys (
    principal        TEXT NOT NULL,          -- 'user:<sub>' or 'admin'
    method           TEXT NOT NULL,
    route            TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      BLOB NOT NULL,          -- SHA-256 of method, route, canonical body
    state            TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    holder           TEXT NOT NULL,          -- fencing token of the current claim
    lease_expires_at INTEGER,                -- in_progress only: takeover allowed after it
    response_status  INTEGER,
    response_body    TEXT,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    PRIMARY KEY (principal, method, route, key),
    CHECK (state = 'in_progress' OR (response_status IS NOT NULL AND response_body IS NOT NULL))
) STRICT;
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- The outbox carries its own delivery state, as in Postgres (0003_delivery).
CREATE TABLE outbox_events (
    event_id        TEXT PRIMARY KEY,
    topic           TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    payload         TEXT NOT NULL,           -- JSON
    created_at      INTEGER NOT NULL,
    published_at    INTEGER,
    due_at          INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    settled_at      INTEGER,
    last_error      TEXT,
    first_failed_at INTEGER,
    -- A consumer's lease on the row while it delivers (instead of FOR UPDATE).
    locked_by       TEXT,
    locked_until    INTEGER
) STRICT;
CREATE INDEX outbox_events_due ON outbox_events (due_at) WHERE settled_at IS NULL;
CREATE INDEX outbox_events_settled ON outbox_events (settled_at) WHERE settled_at IS NOT NULL;

CREATE TABLE inbox (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
) STRICT;
CREATE INDEX inbox_processed ON inbox (processed_at);

CREATE TABLE dead_letters (
    id              TEXT PRIMARY KEY,
    event_id        TEXT NOT NULL,
    consumer        TEXT NOT NULL,
    topic           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    last_error      TEXT NOT NULL,
    first_failed_at INTEGER NOT NULL,
    dead_at         INTEGER NOT NULL,
    replayed_at     INTEGER,
    discarded_at    INTEGER,
    UNIQUE (consumer, event_id)
) STRICT;
CREATE INDEX dead_letters_open ON dead_letters (dead_at)
    WHERE replayed_at IS NULL AND discarded_at IS NULL;

CREATE TABLE dlq_audit (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    dead_letter_id TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    action         TEXT NOT NULL CHECK (action IN ('replay', 'discard')),
    actor          TEXT NOT NULL,
    at             INTEGER NOT NULL
) STRICT;

CREATE TABLE ledger_entries (
    charge_id     TEXT PRIMARY KEY REFERENCES charges (id),
    event_id      TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    applied_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX ledger_entries_user_id ON ledger_entries (user_id);
