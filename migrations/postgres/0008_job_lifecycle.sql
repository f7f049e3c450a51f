-- A job can be edited and closed: its status, a version that counts its
-- changes, when it last changed, and the lowercased texts a list or stream
-- filter compares (written by Herald from Rust, so both backends and the
-- stream lowercase alike; `herald migrate` fills them for older jobs).
ALTER TABLE jobs
    ADD COLUMN status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    ADD COLUMN version      bigint NOT NULL DEFAULT 1,
    ADD COLUMN updated_at   timestamptz,
    ADD COLUMN search_text  text,
    ADD COLUMN location_key text,
    ADD COLUMN company_key  text;
UPDATE jobs SET updated_at = posted_at;
ALTER TABLE jobs ALTER COLUMN updated_at SET NOT NULL;
-- The list: open jobs, newest first.
CREATE INDEX jobs_open ON jobs (id DESC) WHERE status = 'open';

-- Wake every relay for a job's edits and close too, as for its post (rare
-- admin writes: the NOTIFY's commit lock costs nothing here).
DROP TRIGGER outbox_events_notify ON outbox_events;
CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
    FOR EACH ROW WHEN (NEW.topic IN ('job.posted', 'job.updated', 'job.closed'))
    EXECUTE FUNCTION herald_outbox_notify();
