-- Counters of the durable effects (emails sent, ledger entries), kept by
-- triggers inside the effect's own transaction, so /metrics and
-- /admin/status read two rows instead of counting tables that never shrink.
-- (One writer at a time: no need for the Postgres store's shards.)
CREATE TABLE effect_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

INSERT INTO effect_counters (name, value) VALUES
    ('emails_delivered', (SELECT count(*) FROM applications WHERE email_status = 'sent')),
    ('ledger_entries', (SELECT count(*) FROM ledger_entries));

CREATE TRIGGER applications_count_sent AFTER UPDATE OF email_status ON applications
    WHEN (OLD.email_status = 'sent') <> (NEW.email_status = 'sent')
BEGIN
    UPDATE effect_counters
       SET value = value + (NEW.email_status = 'sent') - (OLD.email_status = 'sent')
     WHERE name = 'emails_delivered';
END;

CREATE TRIGGER ledger_entries_count AFTER INSERT ON ledger_entries
BEGIN
    UPDATE effect_counters SET value = value + 1 WHERE name = 'ledger_entries';
END;

CREATE TRIGGER ledger_entries_uncount AFTER DELETE ON ledger_entries
BEGIN
    UPDATE effect_counters SET value = value - 1 WHERE name = 'ledger_entries';
END;
