-- A dead letter names the effect its consumer's delivery has: the same
-- change as migrations/postgres/0007.
ALTER TABLE dead_letters ADD COLUMN effect TEXT;
UPDATE dead_letters
   SET effect = CASE consumer
                    WHEN 'email' THEN 'application_email'
                    WHEN 'ledger' THEN 'charge_ledger'
                END;
