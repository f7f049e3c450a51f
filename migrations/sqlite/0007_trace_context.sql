-- The W3C trace context an event was committed in (NULL when traces are
-- off): the relay's publish continues that trace, the consumer links to it.
ALTER TABLE outbox_events ADD COLUMN traceparent TEXT;
