-- An email's life after `sent` (src/domain/email.rs), and the addresses
-- Herald no longer mails.
--
-- email_status  Herald's side: pending, sent, dead, and now suppressed (a
--               confirmation to a suppressed address, settled without a
--               request).
-- email_id      the provider's id of the sent email (Resend's), which its
--               webhooks name.
-- email_report  the provider's side, after sent: delivered, bounced,
--               complained, failed, suppressed (its own list). The API
--               shows it over `sent`.
ALTER TABLE applications DROP CONSTRAINT applications_email_status_check;
ALTER TABLE applications ADD CONSTRAINT applications_email_status_check
    CHECK (email_status IN ('pending', 'sent', 'dead', 'suppressed'));
ALTER TABLE applications
    ADD COLUMN email_id        text,
    ADD COLUMN email_report    text
               CHECK (email_report IN ('delivered', 'bounced', 'complained', 'failed', 'suppressed')),
    ADD COLUMN email_report_at timestamptz;
CREATE INDEX applications_email_id ON applications (email_id) WHERE email_id IS NOT NULL;

-- Every verified webhook delivery, by its `svix-id`: a redelivery finds its
-- row and changes nothing. A report about an email whose send Herald has
-- not recorded yet (it can outrun the commit, or a crash between the send
-- and the commit) waits here as `unknown_email` and is applied when the
-- send is recorded with that id. The janitor deletes rows past janitor.retention_secs
-- (Resend stops retrying a message after about a day and a half).
CREATE TABLE provider_events (
    id          text PRIMARY KEY,            -- svix-id
    type        text NOT NULL,               -- email.bounced, ...
    event       text,                        -- what Herald read in it (bounced_permanent, ...)
    email_id    text,
    outcome     text NOT NULL,               -- applied, unchanged, unknown_email, ignored
    detail      text,                        -- the bounce's message, if any
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_events_received ON provider_events (received_at);
CREATE INDEX provider_events_waiting ON provider_events (email_id) WHERE outcome = 'unknown_email';

-- Addresses that bounced for good or complained: their confirmations are
-- settled `suppressed` without a request. `address` is lowercased by Herald.
CREATE TABLE suppressions (
    address        text PRIMARY KEY,
    reason         text NOT NULL CHECK (reason IN ('bounced', 'complained', 'provider_suppressed')),
    email_id       text,                     -- the email that caused it
    application_id uuid,
    suppressed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX suppressions_newest ON suppressions (suppressed_at DESC, address DESC);

-- What admins did besides the dead-letter actions (dlq_audit): lifting a
-- suppression, with what was lifted.
CREATE TABLE admin_audit (
    id      bigserial PRIMARY KEY,
    action  text NOT NULL,                   -- suppression.lift
    subject text NOT NULL,                   -- the address
    detail  text NOT NULL,                   -- JSON: what it was
    actor   text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
