-- Batched sending and publish-once relaying: the same tables as
-- migrations/postgres/0006, with a lease (locked_by, locked_until) where
-- Postgres holds a row lock during the send.
CREATE TABLE send_batches (
    id              TEXT PRIMARY KEY,
    consumer        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    due_at          INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    first_failed_at INTEGER,
    settled_at      INTEGER,
    locked_by       TEXT,
    locked_until    INTEGER
) STRICT;
CREATE INDEX send_batches_due ON send_batches (consumer, due_at) WHERE settled_at IS NULL;
CREATE INDEX send_batches_settled ON send_batches (settled_at) WHERE settled_at IS NOT NULL;

ALTER TABLE outbox_events ADD COLUMN batch_id TEXT;
ALTER TABLE outbox_events ADD COLUMN stream_id TEXT;
CREATE INDEX outbox_events_batch ON outbox_events (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX outbox_events_topic_due ON outbox_events (topic, due_at)
    WHERE settled_at IS NULL AND batch_id IS NULL;
