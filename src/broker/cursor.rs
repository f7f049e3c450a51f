//! [`EventCursor`]: a position in the one order in which events were
//! published, and the text of an SSE `id:` / `Last-Event-ID`. It parses
//! untrusted input and depends on nothing but `std`, so the fuzz crate
//! (`fuzz/`) compiles this file alone.

/// A position in the one global order in which events were published: a
/// Redis Stream entry id (`<milliseconds>-<sequence>`; the in-process broker
/// numbers its entries the same way). The SSE `id:` of
/// every stream event, and what `Last-Event-ID` carries back; the same in
/// every process, so a client may resume on any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventCursor {
    pub millis: u64,
    pub seq: u64,
}

impl EventCursor {
    /// Before every event.
    pub const ZERO: EventCursor = EventCursor { millis: 0, seq: 0 };

    /// Parses `<digits>-<digits>` (a bare `<digits>` means sequence 0, as in
    /// Redis). Anything else is `None`: a client's cursor is untrusted input.
    pub fn parse(text: &str) -> Option<EventCursor> {
        let text = text.trim();
        let (millis, seq) = match text.split_once('-') {
            Some((m, s)) => (m, s),
            None => (text, "0"),
        };
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(millis) || !digits(seq) {
            return None;
        }
        Some(EventCursor {
            millis: millis.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.millis, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::EventCursor;

    #[test]
    fn a_cursor_round_trips_through_its_text_and_orders_like_redis_ids() {
        let a = EventCursor::parse("1700000000000-3").unwrap();
        assert_eq!(a.to_string(), "1700000000000-3");
        assert!(a < EventCursor::parse("1700000000000-10").unwrap());
        assert!(a < EventCursor::parse("1700000000001-0").unwrap());
        assert_eq!(
            EventCursor::parse("42"),
            Some(EventCursor { millis: 42, seq: 0 })
        );
    }

    #[test]
    fn a_malformed_cursor_is_refused_not_guessed() {
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "1 -2",
            "99999999999999999999999-0",
            "+1-0",
        ] {
            assert_eq!(EventCursor::parse(bad), None, "{bad:?}");
        }
    }
}
