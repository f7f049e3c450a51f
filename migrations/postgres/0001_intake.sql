-- Jobs, applications, idempotency keys and the transactional outbox.

CREATE TABLE jobs (
    id          uuid PRIMARY KEY,            -- UUIDv7: time-ordered, the list cursor
    title       text NOT NULL,
    company     text NOT NULL,
    location    text NOT NULL,
    description text NOT NULL,
    posted_at   timestamptz NOT NULL
);

CREATE TABLE applications (
    id           uuid PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id),
    user_id      text NOT NULL,              -- JWT sub
    email        text NOT NULL,              -- JWT email: the confirmation's recipient
    resume_url   text,
    cover_letter text,
    email_status text NOT NULL DEFAULT 'pending'
                 CHECK (email_status IN ('pending', 'sent', 'dead')),
    created_at   timestamptz NOT NULL,
    UNIQUE (user_id, job_id)                 -- one application per user and job, whatever the keys
);

CREATE TABLE idempotency_keys (
    principal        text NOT NULL,          -- 'user:<sub>' or 'admin'
    method           text NOT NULL,
    route            text NOT NULL,
    key              text NOT NULL,
    fingerprint      bytea NOT NULL,         -- SHA-256 of method, route, canonical body
    state            text NOT NULL CHECK (state IN ('in_progress', 'completed')),
    holder           uuid NOT NULL,          -- fencing token of the current claim
    lease_expires_at timestamptz,            -- in_progress only: takeover allowed after it
    response_status  smallint,
    response_body    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (principal, method, route, key),
    CHECK (state = 'in_progress' OR (response_status IS NOT NULL AND response_body IS NOT NULL))
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

CREATE TABLE outbox_events (
    event_id     uuid PRIMARY KEY,
    topic        text NOT NULL,
    aggregate_id uuid NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_events_unpublished ON outbox_events (created_at) WHERE published_at IS NULL;
