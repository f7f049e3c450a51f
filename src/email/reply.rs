//! What the provider's answer to one `POST /emails/batch` means, decided
//! from its status, headers and body alone ([`classify_batch_reply`]).
//!
//! The provider's reply is the last place where an email can be lost while
//! Herald's database says it went, so nothing in it is taken on trust:
//! - a success counts only for the emails it names: in permissive mode,
//!   `data` holds one id per accepted email, in request order, and `errors`
//!   names each refused one by its `index`, once, in range; together they
//!   cover every member exactly once. Anything else (`{"data": []}`, an id
//!   too few or too many, an index out of range or repeated, a body that is
//!   not the documented shape) means the outcome is unknown
//!   ([`SendError::ReplyInvalid`]): the batch is sent again under its same
//!   key, never recorded as sent and never sent under a new key;
//! - every delay the reply carries (`retry-after`, `ratelimit-reset`) is a
//!   number of seconds read without overflow and capped at the caller's
//!   `max_delay` (`retry.max_delay_ms`), so no header can stall delivery
//!   for years or panic a sender.
//!
//! It depends on nothing but `std`, `serde` and `serde_json`, so the fuzz
//! crate (`fuzz/`) compiles this file alone and feeds it arbitrary replies.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

/// Why a send did not succeed, classified for the retry policy
/// (docs/ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// The provider is over its rate or quota (429): every sender of the
    /// process waits `retry_after`, and the batch is sent again.
    #[error("rate limited: {reason}")]
    RateLimited {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Worth retrying (timeouts, connection errors, 5xx, a concurrent request
    /// under the same key). `retry_after` is the downstream's floor.
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The provider answered, but not in a way that says which emails it
    /// accepted: the outcome is unknown. Retried under the same key; past
    /// the retry budget its members are dead letters
    /// [`PROVIDER_REPLY_INVALID`].
    #[error("{PROVIDER_REPLY_INVALID}: {0}")]
    ReplyInvalid(String),
    /// Retrying cannot help (a documented refusal of the request): dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// The reason a dead letter carries when the provider never answered in a
/// way that names its emails.
pub const PROVIDER_REPLY_INVALID: &str = "provider_reply_invalid";

/// The provider's answer for one email of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAnswer {
    /// Accepted, under the provider's id for it (`None` only where the
    /// provider answered for the whole batch without naming its emails: a
    /// key it accepted before, and for the `file` transport).
    Accepted { provider_id: Option<String> },
    /// Refused for good, with the provider's reason (the rest of the batch
    /// is unaffected).
    Refused(String),
}

/// Longest provider id kept (Resend's are UUIDs).
const MAX_ID_CHARS: usize = 256;
/// Longest provider message kept per refused email or error.
const MAX_MESSAGE_CHARS: usize = 500;

/// The documented success body in permissive mode.
#[derive(Deserialize)]
struct BatchBody {
    data: Vec<Created>,
    #[serde(default)]
    errors: Option<Vec<Refusal>>,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
struct Refusal {
    index: i64,
    message: String,
}

/// The documented error body.
#[derive(Deserialize)]
struct ErrorBody {
    name: String,
    #[serde(default)]
    message: Option<String>,
}

/// A header's value by name, case-insensitively (the first of several).
fn header<'a>(headers: &'a [(&str, &str)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// A delay in seconds as a header gives it (`1`, `0.5`), at most `max`;
/// `None` for anything that is not a non-negative number (an HTTP-date
/// `retry-after` included: Resend sends seconds).
pub fn seconds(value: &str, max: Duration) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 40 {
        return None;
    }
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let secs: f64 = value.parse().ok()?;
            if !secs.is_finite() || secs < 0.0 {
                return None;
            }
            Duration::try_from_secs_f64(secs).unwrap_or(max)
        }
    };
    Some(delay.min(max))
}

/// The request rate the provider says it allows, from `ratelimit-limit`
/// (requests per one-second window, Resend's form; a `;w=N` window, the
/// IETF draft's form, divides it): `None` when absent or not a positive
/// number.
pub fn advertised_rate(headers: &[(&str, &str)]) -> Option<f64> {
    let value = header(headers, "ratelimit-limit")?.trim();
    if value.len() > 80 {
        return None;
    }
    let mut parts = value.split(',').next()?.split(';');
    let limit: f64 = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse::<f64>().ok())
        .unwrap_or(1.0);
    let rate = limit / window;
    (rate.is_finite() && rate > 0.0 && limit <= 1e6 && window >= 1e-3).then_some(rate)
}

/// The longest delay the reply asks for (`retry-after`, `ratelimit-reset`),
/// capped at `max`.
pub fn provider_delay(headers: &[(&str, &str)], max: Duration) -> Option<Duration> {
    ["retry-after", "ratelimit-reset"]
        .iter()
        .filter_map(|name| seconds(header(headers, name)?, max))
        .max()
}

/// At most `MAX_MESSAGE_CHARS` of a provider's text, on one line.
fn short(text: &str) -> String {
    text.chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What a reply to a batch of `members` emails means: one answer per
/// member, in request order, or why the batch as a whole did not go.
pub fn classify_batch_reply(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    members: usize,
    max_delay: Duration,
) -> Result<Vec<MemberAnswer>, SendError> {
    let delay = provider_delay(headers, max_delay);
    let error = serde_json::from_slice::<ErrorBody>(body).ok();
    let named = |what: &str| match &error {
        Some(e) => format!(
            "{status} {}: {}",
            short(&e.name),
            short(e.message.as_deref().unwrap_or(""))
        ),
        None => format!("{status} {what}"),
    };
    match status {
        200..=299 => answers(body, members),
        429 => Err(SendError::RateLimited {
            reason: named("rate limited"),
            retry_after: delay,
        }),
        // The key was accepted before with another body: Resend keeps a key
        // only after a request with it succeeded, and Herald reuses a
        // batch's key only for that batch, whose body differs only if
        // `email.from` changed since. The batch went; sending it again under
        // a new key would mail everyone twice. Its ids are not known.
        409 if error
            .as_ref()
            .is_some_and(|e| e.name == "invalid_idempotent_request") =>
        {
            Ok(vec![MemberAnswer::Accepted { provider_id: None }; members])
        }
        409 if error
            .as_ref()
            .is_some_and(|e| e.name == "concurrent_idempotent_requests") =>
        {
            Err(SendError::Transient {
                reason: named(""),
                retry_after: delay,
            })
        }
        408 | 425 | 500..=599 => Err(SendError::Transient {
            reason: named("server error"),
            retry_after: delay,
        }),
        // A documented refusal of the request as a whole.
        400..=499 if error.is_some() => Err(SendError::Permanent(named(""))),
        // A 4xx without the provider's error shape (a proxy's page, a
        // wrong path), or a status the API never sends: not the provider
        // speaking about these emails.
        _ => Err(SendError::ReplyInvalid(format!(
            "status {status} without a documented body"
        ))),
    }
}

/// The per-member answers of a success body, or why it names no outcome.
fn answers(body: &[u8], members: usize) -> Result<Vec<MemberAnswer>, SendError> {
    let invalid = |why: String| Err(SendError::ReplyInvalid(why));
    let Ok(parsed) = serde_json::from_slice::<BatchBody>(body) else {
        return invalid("a success body that is not `{\"data\": [{\"id\"}], \"errors\"}`".into());
    };
    let errors = parsed.errors.unwrap_or_default();
    let mut refused: Vec<Option<String>> = vec![None; members];
    for e in &errors {
        let Some(slot) = usize::try_from(e.index)
            .ok()
            .and_then(|i| refused.get_mut(i))
        else {
            return invalid(format!(
                "errors[].index {} is outside the batch of {members}",
                e.index
            ));
        };
        if slot.is_some() {
            return invalid(format!("errors[].index {} is named twice", e.index));
        }
        *slot = Some(short(&e.message));
    }
    if parsed.data.len() + errors.len() != members {
        return invalid(format!(
            "data names {} emails and errors {} for a batch of {members}",
            parsed.data.len(),
            errors.len()
        ));
    }
    let mut seen = HashSet::new();
    for created in &parsed.data {
        let id = &created.id;
        if id.is_empty() || id.chars().count() > MAX_ID_CHARS || id.chars().any(char::is_control) {
            return invalid("data[].id is not an id".into());
        }
        if !seen.insert(id.as_str()) {
            return invalid("data[].id names one email twice".into());
        }
    }
    let mut ids = parsed.data.into_iter().map(|c| c.id);
    refused
        .into_iter()
        .map(|refusal| match refusal {
            Some(message) => Ok(MemberAnswer::Refused(format!(
                "refused by the provider: {message}"
            ))),
            // Counted above: one id for each member not refused.
            None => match ids.next() {
                Some(id) => Ok(MemberAnswer::Accepted {
                    provider_id: Some(id),
                }),
                None => Err(SendError::ReplyInvalid("an id too few".into())),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(60);

    fn reply(status: u16, body: &str, n: usize) -> Result<Vec<MemberAnswer>, SendError> {
        classify_batch_reply(status, &[], body.as_bytes(), n, MAX)
    }

    fn accepted(id: &str) -> MemberAnswer {
        MemberAnswer::Accepted {
            provider_id: Some(id.into()),
        }
    }

    #[test]
    fn the_advertised_rate_is_a_positive_number_per_window_or_nothing() {
        let rate = |v: &str| advertised_rate(&[("RateLimit-Limit", v)]);
        assert_eq!(rate("2"), Some(2.0));
        assert_eq!(rate(" 1 "), Some(1.0));
        assert_eq!(rate("10;w=5"), Some(2.0));
        assert_eq!(rate("4, 100;w=60"), Some(4.0));
        for absurd in ["0", "-1", "NaN", "inf", "fast", "", "1e300", "2;w=0"] {
            assert_eq!(rate(absurd), None, "{absurd}");
        }
        assert_eq!(advertised_rate(&[("retry-after", "2")]), None);
    }

    #[test]
    fn a_success_names_one_id_per_accepted_member_in_order() {
        assert_eq!(
            reply(200, r#"{"data":[{"id":"a"},{"id":"b"}]}"#, 2),
            Ok(vec![accepted("a"), accepted("b")])
        );
        // Permissive: the refused one by index, the ids for the rest in order.
        let answers = reply(
            200,
            r#"{"data":[{"id":"a"},{"id":"c"}],"errors":[{"index":1,"message":"Invalid `to`"}]}"#,
            3,
        )
        .unwrap();
        assert_eq!(answers[0], accepted("a"));
        assert!(matches!(&answers[1], MemberAnswer::Refused(m) if m.contains("Invalid `to`")));
        assert_eq!(answers[2], accepted("c"));
    }

    #[test]
    fn a_success_that_does_not_name_every_member_once_is_an_unknown_outcome() {
        for (body, n) in [
            (r#"{"data":[]}"#, 5),
            (r#"{"data":[{"id":"a"}]}"#, 2),
            (r#"{"data":[{"id":"a"},{"id":"b"},{"id":"c"}]}"#, 2),
            (
                r#"{"data":[{"id":"a"}],"errors":[{"index":2,"message":"x"}]}"#,
                2,
            ),
            (
                r#"{"data":[{"id":"a"}],"errors":[{"index":-1,"message":"x"}]}"#,
                2,
            ),
            (
                r#"{"data":[],"errors":[{"index":0,"message":"x"},{"index":0,"message":"x"}]}"#,
                2,
            ),
            (r#"{"data":[{"id":"a"},{"id":"a"}]}"#, 2),
            (r#"{"data":[{"id":""}]}"#, 1),
            (r#"{"data":[{"id":7}]}"#, 1),
            (r#"{"data":{"id":"a"}}"#, 1),
            ("<html>ok</html>", 1),
            ("", 1),
        ] {
            let got = reply(200, body, n);
            assert!(
                matches!(got, Err(SendError::ReplyInvalid(_))),
                "{body} for {n}: {got:?}"
            );
        }
    }

    #[test]
    fn every_delay_in_a_reply_is_capped_and_none_overflows() {
        let huge = u64::MAX.to_string();
        for name in ["retry-after", "ratelimit-reset"] {
            let got = classify_batch_reply(429, &[(name, &huge)], b"{}", 1, MAX);
            assert_eq!(
                got,
                Err(SendError::RateLimited {
                    reason: "429 rate limited".into(),
                    retry_after: Some(MAX),
                })
            );
        }
        assert_eq!(seconds("2", MAX), Some(Duration::from_secs(2)));
        assert_eq!(seconds("0.5", MAX), Some(Duration::from_millis(500)));
        assert_eq!(seconds("1e300", MAX), Some(MAX));
        for bad in [
            "-1",
            "NaN",
            "inf",
            "soon",
            "",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(seconds(bad, MAX), None, "{bad}");
        }
        // The longer of the two is the floor.
        let headers = [("Retry-After", "3"), ("RateLimit-Reset", "1")];
        assert_eq!(provider_delay(&headers, MAX), Some(Duration::from_secs(3)));
    }

    #[test]
    fn errors_are_classified_by_status_and_the_documented_body() {
        let body = |name: &str| format!(r#"{{"statusCode":0,"name":"{name}","message":"m"}}"#);
        assert!(matches!(
            reply(503, "", 1),
            Err(SendError::Transient { .. })
        ));
        assert!(matches!(
            reply(422, &body("validation_error"), 1),
            Err(SendError::Permanent(_))
        ));
        assert!(matches!(
            reply(409, &body("concurrent_idempotent_requests"), 1),
            Err(SendError::Transient { .. })
        ));
        assert_eq!(
            reply(409, &body("invalid_idempotent_request"), 2),
            Ok(vec![MemberAnswer::Accepted { provider_id: None }; 2])
        );
        // Not the provider's shape: not the provider refusing these emails.
        for (status, text) in [(403, "<html>Forbidden</html>"), (302, ""), (409, "{}")] {
            assert!(
                matches!(reply(status, text, 1), Err(SendError::ReplyInvalid(_))),
                "{status}"
            );
        }
        let invalid = SendError::ReplyInvalid("why".into()).to_string();
        assert!(invalid.starts_with(PROVIDER_REPLY_INVALID), "{invalid}");
    }
}
