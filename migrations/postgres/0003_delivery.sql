-- Delivery: the outbox row carries its own delivery state, so retries and
-- redelivery survive any loss of Redis (docs/ARCHITECTURE.md).
--
-- due_at      when the relay may (re)publish the row. Set to now() at insert;
--             on publish moved to now() + relay.redeliver_after_secs (if no
--             consumer settles it by then, it is published again); on a
--             transient failure moved to the retry time.
-- attempts    delivery attempts spent (a deferral for lack of retry budget
--             spends none). A published message carries it; a consumer
--             ignores a copy whose count is stale.
-- settled_at  the consumer recorded the event (inbox) or dead-lettered it;
--             fan-out topics settle when published. Unsettled rows are the
--             relay's business; settled ones the janitor's.
ALTER TABLE outbox_events
    ADD COLUMN due_at     timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN attempts   integer NOT NULL DEFAULT 0,
    ADD COLUMN settled_at timestamptz,
    ADD COLUMN last_error text,
    ADD COLUMN first_failed_at timestamptz;

DROP INDEX outbox_events_unpublished;
CREATE INDEX outbox_events_due ON outbox_events (due_at) WHERE settled_at IS NULL;
CREATE INDEX outbox_events_settled ON outbox_events (settled_at) WHERE settled_at IS NOT NULL;

-- Wake every relay when a job is posted (relays also poll, and a process
-- wakes its own relay after its own commits). Only for job.posted: a NOTIFY
-- takes a database-wide lock at commit, which per application would
-- serialise the intake path.
CREATE FUNCTION herald_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
    FOR EACH ROW WHEN (NEW.topic = 'job.posted')
    EXECUTE FUNCTION herald_outbox_notify();

-- Inbox: what each consumer has applied, written with the local effect.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    event_id     uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX inbox_processed ON inbox (processed_at);

-- Dead letters: deliveries that failed permanently or ran out of attempts.
-- One row per (consumer, event) for its whole life: replayed_at or
-- discarded_at close it; dying again reopens it.
CREATE TABLE dead_letters (
    id              uuid PRIMARY KEY,
    event_id        uuid NOT NULL,
    consumer        text NOT NULL,
    topic           text NOT NULL,
    attempts        integer NOT NULL,
    last_error      text NOT NULL,
    first_failed_at timestamptz NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz,
    discarded_at    timestamptz,
    UNIQUE (consumer, event_id)
);
CREATE INDEX dead_letters_open ON dead_letters (dead_at)
    WHERE replayed_at IS NULL AND discarded_at IS NULL;

-- Who did what to a dead letter, and when.
CREATE TABLE dlq_audit (
    id             bigserial PRIMARY KEY,
    dead_letter_id uuid NOT NULL,
    event_id       uuid NOT NULL,
    action         text NOT NULL CHECK (action IN ('replay', 'discard')),
    actor          text NOT NULL,
    at             timestamptz NOT NULL DEFAULT now()
);
