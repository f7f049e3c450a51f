-- Batched sending and publish-once relaying (docs/ARCHITECTURE.md,
-- "Delivery when the provider is the bottleneck").
--
-- send_batches: one row per request a consumer makes for several events at
-- once (the EmailSender's POST /emails/batch). Its id is the request's
-- Idempotency-Key; its members are the outbox rows whose batch_id names it,
-- in event_id order. Membership is written once, before the first send, so
-- every retry sends the same emails under the same key.
CREATE TABLE send_batches (
    id              uuid PRIMARY KEY,
    consumer        text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    due_at          timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    first_failed_at timestamptz,
    settled_at      timestamptz
);
CREATE INDEX send_batches_due ON send_batches (consumer, due_at) WHERE settled_at IS NULL;
CREATE INDEX send_batches_settled ON send_batches (settled_at) WHERE settled_at IS NOT NULL;

ALTER TABLE outbox_events
    -- The batch that owns the row's delivery; the relay leaves it alone.
    ADD COLUMN batch_id  uuid,
    -- The broker's id of the copy last published (a stream entry id); NULL
    -- when no copy is believed held, so the row is published when due.
    ADD COLUMN stream_id text;
CREATE INDEX outbox_events_batch ON outbox_events (batch_id) WHERE batch_id IS NOT NULL;
-- The relay serves each topic in its own lane.
CREATE INDEX outbox_events_topic_due ON outbox_events (topic, due_at)
    WHERE settled_at IS NULL AND batch_id IS NULL;
