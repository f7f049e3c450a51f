-- Filters that cost what they return (as migrations/postgres/0012): `q` by
-- an FTS5 trigram index over each job's `search_text` (a phrase of three
-- characters or more finds exactly the jobs holding it; a shorter `q` is
-- matched by scanning), location and company by an index each.
--
-- The index is an external-content FTS5 table keyed by `search_id`, a
-- number of the job's own: the implicit rowid would do, but VACUUM may
-- renumber it and the index would then name other jobs.
ALTER TABLE jobs ADD COLUMN search_id INTEGER;
UPDATE jobs SET search_id = rowid;
CREATE UNIQUE INDEX jobs_search_id ON jobs (search_id);
CREATE VIRTUAL TABLE jobs_search USING fts5(
    search_text, content = 'jobs', content_rowid = 'search_id',
    tokenize = 'trigram case_sensitive 1'
);
INSERT INTO jobs_search (jobs_search) VALUES ('rebuild');

CREATE TRIGGER jobs_search_insert AFTER INSERT ON jobs
BEGIN
    UPDATE jobs SET search_id = (SELECT coalesce(max(search_id), 0) + 1 FROM jobs)
     WHERE rowid = new.rowid AND new.search_id IS NULL;
    INSERT INTO jobs_search (rowid, search_text)
    SELECT search_id, search_text FROM jobs WHERE rowid = new.rowid;
END;
CREATE TRIGGER jobs_search_update AFTER UPDATE OF search_text ON jobs
BEGIN
    INSERT INTO jobs_search (jobs_search, rowid, search_text)
    VALUES ('delete', old.search_id, old.search_text);
    INSERT INTO jobs_search (rowid, search_text) VALUES (new.search_id, new.search_text);
END;
CREATE TRIGGER jobs_search_delete AFTER DELETE ON jobs
BEGIN
    INSERT INTO jobs_search (jobs_search, rowid, search_text)
    VALUES ('delete', old.search_id, old.search_text);
END;

CREATE INDEX jobs_open_location ON jobs (status, location_key, id);
CREATE INDEX jobs_open_company ON jobs (status, company_key, id);
