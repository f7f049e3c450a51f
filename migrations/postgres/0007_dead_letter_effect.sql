-- A dead letter names the effect its consumer's delivery has (the typed
-- effect the consumer hands the store: src/store/delivery.rs, `Effect`), so
-- that replaying it resets that aggregate without the store reading the
-- event's topic. Letters written before this migration take it from their
-- consumer, the only consumers there were.
ALTER TABLE dead_letters ADD COLUMN effect text;
UPDATE dead_letters
   SET effect = CASE consumer
                    WHEN 'email' THEN 'application_email'
                    WHEN 'ledger' THEN 'charge_ledger'
                END;
