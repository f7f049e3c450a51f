-- The effect counters (0005), kept per statement instead of per row, on one
-- shard per transaction. A batch settle updates a hundred applications in
-- one statement: the row triggers bumped up to sixteen shards in no set
-- order, so settles had to take every shard first and ran one at a time.
-- Now a statement adds its whole delta (from its transition tables) to the
-- shard `txid_current() % 64`: a transaction touches one row per counter,
-- two settles collide only when their transactions share a shard, and a
-- collision is a short wait, never a deadlock. The sum over the shards is
-- the count, as before.
DROP TRIGGER applications_count_sent ON applications;
DROP TRIGGER ledger_entries_count ON ledger_entries;
DROP FUNCTION herald_count_sent_email();
DROP FUNCTION herald_count_ledger_entry();

INSERT INTO effect_counters (name, shard, value)
SELECT name, shard, 0
  FROM unnest(ARRAY['emails_delivered', 'ledger_entries']) AS name,
       generate_series(16, 63) AS shard;

CREATE FUNCTION herald_add_to_counter(counter text, delta bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE effect_counters SET value = value + delta
     WHERE name = counter AND shard = txid_current() % 64 AND delta <> 0;
$$;

CREATE FUNCTION herald_count_sent_emails() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM herald_add_to_counter('emails_delivered',
        (SELECT coalesce(sum((n.email_status = 'sent')::int - (o.email_status = 'sent')::int), 0)
           FROM old_rows o JOIN new_rows n USING (id)));
    RETURN NULL;
END $$;

CREATE FUNCTION herald_count_ledger_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM herald_add_to_counter('ledger_entries', (SELECT count(*) FROM new_rows));
    ELSE
        PERFORM herald_add_to_counter('ledger_entries', -(SELECT count(*) FROM old_rows));
    END IF;
    RETURN NULL;
END $$;

-- A trigger with transition tables takes no column list and one event:
-- every UPDATE of applications runs it (once per statement, not per row).
CREATE TRIGGER applications_count_sent AFTER UPDATE ON applications
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_count_sent_emails();
CREATE TRIGGER ledger_entries_count_insert AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_count_ledger_entries();
CREATE TRIGGER ledger_entries_count_delete AFTER DELETE ON ledger_entries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_count_ledger_entries();
