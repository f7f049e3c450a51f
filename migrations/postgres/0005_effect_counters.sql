-- Counters of the durable effects (emails sent, ledger entries), kept by
-- triggers inside the effect's own transaction, so /metrics and
-- /admin/status read sixteen small rows instead of counting tables that
-- never shrink. Sixteen shards per counter: concurrent deliveries rarely
-- touch the same row, so the counter is no point of contention.
CREATE TABLE effect_counters (
    name  text     NOT NULL,
    shard smallint NOT NULL,
    value bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (name, shard)
);

CREATE FUNCTION herald_count_sent_email() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE effect_counters
       SET value = value + (CASE WHEN NEW.email_status = 'sent' THEN 1 ELSE 0 END)
                         - (CASE WHEN OLD.email_status = 'sent' THEN 1 ELSE 0 END)
     WHERE name = 'emails_delivered' AND shard = abs(hashtext(NEW.id::text)) % 16;
    RETURN NULL;
END $$;

CREATE FUNCTION herald_count_ledger_entry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE effect_counters SET value = value + 1
         WHERE name = 'ledger_entries' AND shard = abs(hashtext(NEW.charge_id::text)) % 16;
    ELSE
        UPDATE effect_counters SET value = value - 1
         WHERE name = 'ledger_entries' AND shard = abs(hashtext(OLD.charge_id::text)) % 16;
    END IF;
    RETURN NULL;
END $$;

-- The triggers first: creating them locks both tables against writes until
-- this migration commits, so the counts below miss nothing that other
-- processes (still on the previous version) write meanwhile.
CREATE TRIGGER applications_count_sent AFTER UPDATE OF email_status ON applications
    FOR EACH ROW
    WHEN ((OLD.email_status = 'sent') IS DISTINCT FROM (NEW.email_status = 'sent'))
    EXECUTE FUNCTION herald_count_sent_email();
CREATE TRIGGER ledger_entries_count AFTER INSERT OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION herald_count_ledger_entry();

INSERT INTO effect_counters (name, shard, value)
SELECT name, shard, 0
  FROM unnest(ARRAY['emails_delivered', 'ledger_entries']) AS name,
       generate_series(0, 15) AS shard;
UPDATE effect_counters
   SET value = (SELECT count(*) FROM applications WHERE email_status = 'sent')
 WHERE name = 'emails_delivered' AND shard = 0;
UPDATE effect_counters
   SET value = (SELECT count(*) FROM ledger_entries)
 WHERE name = 'ledger_entries' AND shard = 0;
