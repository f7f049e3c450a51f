-- A job can be edited and closed: the same change as migrations/postgres/0008.
-- SQLite adds a column NOT NULL only with a default; `updated_at` is filled
-- here and always written by Herald.
ALTER TABLE jobs ADD COLUMN status TEXT NOT NULL DEFAULT 'open'
    CHECK (status IN ('open', 'closed'));
ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN updated_at INTEGER;
ALTER TABLE jobs ADD COLUMN search_text TEXT;
ALTER TABLE jobs ADD COLUMN location_key TEXT;
ALTER TABLE jobs ADD COLUMN company_key TEXT;
UPDATE jobs SET updated_at = posted_at;
CREATE INDEX jobs_open ON jobs (status, id);
