-- An email's life after `sent`: the same change as migrations/postgres/0009.
-- SQLite cannot change a CHECK constraint in place, so `applications` is
-- rebuilt (https://www.sqlite.org/lang_altertable.html, "otheralter"): no
-- table references it, and its trigger is created again below.
CREATE TABLE applications_new (
    id              TEXT PRIMARY KEY,
    job_id          TEXT NOT NULL REFERENCES jobs (id),
    user_id         TEXT NOT NULL,
    email           TEXT NOT NULL,
    resume_url      TEXT,
    cover_letter    TEXT,
    email_status    TEXT NOT NULL DEFAULT 'pending'
                    CHECK (email_status IN ('pending', 'sent', 'dead', 'suppressed')),
    created_at      INTEGER NOT NULL,
    email_id        TEXT,
    email_report    TEXT
                    CHECK (email_report IN ('delivered', 'bounced', 'complained', 'failed', 'suppressed')),
    email_report_at INTEGER,
    UNIQUE (user_id, job_id)
) STRICT;
INSERT INTO applications_new
       (id, job_id, user_id, email, resume_url, cover_letter, email_status, created_at)
SELECT id, job_id, user_id, email, resume_url, cover_letter, email_status, created_at
  FROM applications;
DROP TABLE applications;
ALTER TABLE applications_new RENAME TO applications;
CREATE INDEX applications_email_id ON applications (email_id) WHERE email_id IS NOT NULL;

CREATE TRIGGER applications_count_sent AFTER UPDATE OF email_status ON applications
    WHEN (OLD.email_status = 'sent') <> (NEW.email_status = 'sent')
BEGIN
    UPDATE effect_counters
       SET value = value + (NEW.email_status = 'sent') - (OLD.email_status = 'sent')
     WHERE name = 'emails_delivered';
END;

CREATE TABLE provider_events (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    event       TEXT,
    email_id    TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT,
    received_at INTEGER NOT NULL
) STRICT;
CREATE INDEX provider_events_received ON provider_events (received_at);
CREATE INDEX provider_events_waiting ON provider_events (email_id) WHERE outcome = 'unknown_email';

CREATE TABLE suppressions (
    address        TEXT PRIMARY KEY,
    reason         TEXT NOT NULL CHECK (reason IN ('bounced', 'complained', 'provider_suppressed')),
    email_id       TEXT,
    application_id TEXT,
    suppressed_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX suppressions_newest ON suppressions (suppressed_at DESC, address DESC);

CREATE TABLE admin_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL,
    actor   TEXT NOT NULL,
    at      INTEGER NOT NULL
) STRICT;
