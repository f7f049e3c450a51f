-- Filters that cost what they return. `q` (a substring of a job's
-- lowercased title, company and description) is answered by a trigram
-- index, as `search_text LIKE '%q%'` (src/domain/job.rs escapes it);
-- location and company by an index each, in list order. Before these, every
-- filtered list read every open job's text. pg_trgm ships with PostgreSQL
-- (contrib) and is a trusted extension: a database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX jobs_open_search ON jobs USING gin (search_text gin_trgm_ops) WHERE status = 'open';
CREATE INDEX jobs_open_location ON jobs (location_key, id DESC) WHERE status = 'open';
CREATE INDEX jobs_open_company ON jobs (company_key, id DESC) WHERE status = 'open';
-- A `q` reads the newest jobs' texts directly (src/store/board.rs,
-- Q_WINDOW): lz4 decompresses them several times faster than the default
-- pglz (new and rewritten values; PostgreSQL 14 and later).
ALTER TABLE jobs ALTER COLUMN search_text SET COMPRESSION lz4,
                 ALTER COLUMN description SET COMPRESSION lz4;
