//! Typed domain values: what the API accepts and what it returns.
//!
//! Request types are parsed with `deny_unknown_fields` and then validated on
//! construction ([`NewJob::parse`], [`NewApplication::parse`]), so a value of
//! these types is always acceptable to the store. Resource types serialise to
//! the JSON shapes of the HTTP API (docs/openapi.yaml) (ids as strings, times RFC 3339).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a request body was refused; becomes a 400 `invalid_body`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBody(pub String);

pub mod email;
pub mod job;

pub use email::*;
pub use job::*;

/// Topics of outbox events.
pub mod topics {
    pub const JOB_POSTED: &str = "job.posted";
    pub const JOB_UPDATED: &str = "job.updated";
    pub const JOB_CLOSED: &str = "job.closed";
    /// A stream event only, never an outbox topic: an edit took the job out
    /// of the client's filter.
    pub const JOB_REMOVED: &str = "job.removed";
    pub const APPLICATION_SUBMITTED: &str = "application.submitted";
    pub const CHARGE_CREATED: &str = "charge.created";
    /// Every topic, for validating a `?topic=` filter.
    pub const ALL: [&str; 5] = [
        JOB_POSTED,
        JOB_UPDATED,
        JOB_CLOSED,
        APPLICATION_SUBMITTED,
        CHARGE_CREATED,
    ];
    /// The broker stream every job event goes to: one stream, so a reader
    /// (the SseHub) sees a job's post, edits and close in one order under
    /// one cursor.
    pub const JOBS_STREAM: &str = "jobs";

    /// The broker stream a topic's events are published to.
    pub fn stream(topic: &str) -> &str {
        match topic {
            JOB_POSTED | JOB_UPDATED | JOB_CLOSED => JOBS_STREAM,
            other => other,
        }
    }
}

/// The identity of an authenticated user, taken from a verified JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The JWT `sub`: stable id from the job board's login.
    pub id: String,
    /// The JWT `email`: the only address a confirmation may go to.
    pub email: String,
}

impl User {
    /// The idempotency principal: a key is never shared between users.
    pub fn principal(&self) -> String {
        format!("user:{}", self.id)
    }
}

/// An application of one user to one job (at most one per pair).
#[derive(Debug, Clone, PartialEq)]
pub struct Application {
    pub id: Uuid,
    pub job_id: Uuid,
    pub user_id: String,
    pub email: String,
    pub resume_url: Option<String>,
    pub cover_letter: Option<String>,
    /// As the API shows it: Herald's status and the provider's report
    /// ([`EmailStatus::shown`]).
    pub email_status: EmailStatus,
    pub created_at: DateTime<Utc>,
}

/// The `application.submitted` event's payload: what the confirmation email
/// needs, fixed at the moment of applying (a later edit of the job does not
/// change an email already promised). Both backends store exactly this
/// shape, and the EmailSender reads it back as this type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApplicationSubmitted {
    pub application_id: Uuid,
    pub job_id: Uuid,
    pub user_id: String,
    pub email: String,
    pub job_title: String,
    pub company: String,
}

impl ApplicationSubmitted {
    /// The payload's field that holds the job's title. A backend that reads
    /// the job row in the same statement as it writes the event (Postgres)
    /// fills this field and [`Self::COMPANY`] from the row under these names.
    pub const JOB_TITLE: &'static str = "job_title";
    /// The payload's field that holds the job's company.
    pub const COMPANY: &'static str = "company";

    pub fn of(application: &Application, job_title: &str, company: &str) -> Self {
        ApplicationSubmitted {
            application_id: application.id,
            job_id: application.job_id,
            user_id: application.user_id.clone(),
            email: application.email.clone(),
            job_title: job_title.to_string(),
            company: company.to_string(),
        }
    }
}

/// The API view of an application. `already_applied` says whether this
/// response returned an existing application instead of creating one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApplicationView {
    pub id: Uuid,
    pub job_id: Uuid,
    pub email_status: EmailStatus,
    pub already_applied: bool,
    pub resume_url: Option<String>,
    pub cover_letter: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Application {
    pub fn view(&self, already_applied: bool) -> ApplicationView {
        ApplicationView {
            id: self.id,
            job_id: self.job_id,
            email_status: self.email_status,
            already_applied,
            resume_url: self.resume_url.clone(),
            cover_letter: self.cover_letter.clone(),
            created_at: self.created_at,
        }
    }
}

/// A page of a list endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_before: Option<String>,
}

/// A required one-line text: it reaches an email header (a job's title and
/// company make the confirmation's Subject), where a CR or LF would start a
/// header of the sender's choosing, so line breaks are refused.
pub(crate) fn required_line(field: &str, value: String, max: usize) -> Result<String, InvalidBody> {
    if value.contains(['\r', '\n']) {
        return Err(InvalidBody(format!(
            "`{field}` must be one line (no CR or LF)"
        )));
    }
    required_text(field, value, max)
}

pub(crate) fn required_text(field: &str, value: String, max: usize) -> Result<String, InvalidBody> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(InvalidBody(format!("`{field}` must not be empty")));
    }
    optional_text(field, Some(value), max).map(|v| v.unwrap_or_default())
}

pub(crate) fn optional_text(
    field: &str,
    value: Option<String>,
    max: usize,
) -> Result<Option<String>, InvalidBody> {
    match value {
        None => Ok(None),
        Some(v) if v.chars().count() > max => Err(InvalidBody(format!(
            "`{field}` must be at most {max} characters"
        ))),
        Some(v) if v.chars().any(|c| c == '\0') => {
            Err(InvalidBody(format!("`{field}` must not contain NUL")))
        }
        Some(v) => Ok(Some(v)),
    }
}

/// Reads a status column (`pending`, `sent`, …) through the enum's own serde
/// names, so each status is spelt in one place: its `#[serde(rename_all)]`.
pub fn parse_status<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// Parses a JSON body into `T`, mapping every serde failure to [`InvalidBody`].
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, InvalidBody> {
    serde_json::from_slice(body).map_err(|e| InvalidBody(format!("{e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApplicationBody {
    job_id: String,
    #[serde(default)]
    resume_url: Option<String>,
    #[serde(default)]
    cover_letter: Option<String>,
}

/// A validated application request (the user comes from the JWT, not the body).
#[derive(Debug, Clone)]
pub struct NewApplication {
    pub job_id: Uuid,
    pub resume_url: Option<String>,
    pub cover_letter: Option<String>,
}

impl NewApplication {
    pub fn parse(body: &[u8]) -> Result<NewApplication, InvalidBody> {
        let raw: NewApplicationBody = parse_json(body)?;
        let job_id = Uuid::parse_str(&raw.job_id)
            .map_err(|_| InvalidBody("`job_id` must be a job id (UUID)".into()))?;
        let resume_url = optional_text("resume_url", raw.resume_url, 2048)?;
        if let Some(url) = &resume_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(InvalidBody("`resume_url` must be an http(s) URL".into()));
            }
        }
        Ok(NewApplication {
            job_id,
            resume_url,
            cover_letter: optional_text("cover_letter", raw.cover_letter, 10_000)?,
        })
    }
}

/// Whether a charge has reached the ledger.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LedgerStatus {
    Pending,
    Applied,
    Dead,
}

/// A charge of one user, applied to the ledger exactly once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Charge {
    pub id: Uuid,
    #[serde(skip)]
    pub user_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub description: String,
    pub ledger_status: LedgerStatus,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewChargeBody {
    #[serde(deserialize_with = "whole_number")]
    amount_cents: i64,
    currency: String,
    description: String,
}

/// An integer as JSON Schema defines one: `120` or `120.0` (a number with
/// no fractional part), never `120.5` or `"120"`. The published contract
/// (docs/openapi.yaml) says `type: integer`, so whatever a schema-driven
/// client may send as one is accepted; the range is checked by the caller.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    use serde::de::{Error, Unexpected};
    match serde_json::Number::deserialize(deserializer)? {
        n if n.is_i64() => n
            .as_i64()
            .ok_or_else(|| D::Error::custom("integer out of range")),
        n if n.is_u64() => Err(D::Error::invalid_value(
            Unexpected::Other("an integer too large"),
            &"an integer",
        )),
        n => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exactly representable whole numbers only (|f| < 2^53).
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                Ok(f as i64)
            } else {
                Err(D::Error::invalid_value(Unexpected::Float(f), &"an integer"))
            }
        }
    }
}

/// A validated charge request.
#[derive(Debug, Clone)]
pub struct NewCharge {
    /// 1 ..= 10^9 minor units.
    pub amount_cents: i64,
    /// An active ISO 4217 code, upper case.
    pub currency: String,
    pub description: String,
}

/// Largest accepted charge, in minor units.
pub const MAX_AMOUNT_CENTS: i64 = 1_000_000_000;

/// Active ISO 4217 alphabetic codes.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XAG", "XAU", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF", "XPT", "XSU", "XUA",
    "YER", "ZAR", "ZMW", "ZWG",
];

impl NewCharge {
    pub fn parse(body: &[u8]) -> Result<NewCharge, InvalidBody> {
        let raw: NewChargeBody = parse_json(body)?;
        if !(1..=MAX_AMOUNT_CENTS).contains(&raw.amount_cents) {
            return Err(InvalidBody(format!(
                "`amount_cents` must be a positive integer up to {MAX_AMOUNT_CENTS}"
            )));
        }
        if !ISO_4217.contains(&raw.currency.as_str()) {
            return Err(InvalidBody(
                "`currency` must be an upper-case ISO 4217 code such as EUR or USD".into(),
            ));
        }
        Ok(NewCharge {
            amount_cents: raw.amount_cents,
            currency: raw.currency,
            description: required_text("description", raw.description, 500)?,
        })
    }

    pub fn into_charge(self, id: Uuid, user_id: String, created_at: DateTime<Utc>) -> Charge {
        Charge {
            id,
            user_id,
            amount_cents: self.amount_cents,
            currency: self.currency,
            description: self.description,
            ledger_status: LedgerStatus::Pending,
            created_at,
        }
    }
}

/// The dev-login request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevLogin {
    pub email: String,
}

/// Accepts a plausible address (one `@`, non-empty parts, no spaces or controls,
/// at most 254 characters); deliverability is the email provider's business.
pub fn valid_email(email: &str) -> bool {
    let mut parts = email.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.chars().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_fields_of_an_application_submitted_payload_are_named_as_the_type_names_them() {
        let application = Application {
            id: Uuid::now_v7(),
            job_id: Uuid::now_v7(),
            user_id: "ada".into(),
            email: "ada@example.com".into(),
            resume_url: None,
            cover_letter: None,
            email_status: EmailStatus::Pending,
            created_at: Utc::now(),
        };
        let payload =
            serde_json::to_value(ApplicationSubmitted::of(&application, "Rust", "Acme")).unwrap();
        assert_eq!(payload[ApplicationSubmitted::JOB_TITLE], "Rust");
        assert_eq!(payload[ApplicationSubmitted::COMPANY], "Acme");
        assert_eq!(payload.as_object().unwrap().len(), 6, "{payload}");
    }

    #[test]
    fn an_application_with_an_unknown_field_is_refused() {
        let err =
            NewApplication::parse(br#"{"job_id":"0190a0a0-0000-7000-8000-000000000000","x":1}"#)
                .unwrap_err();
        assert!(err.0.contains("unknown field"), "{}", err.0);
    }

    #[test]
    fn an_application_with_a_non_uuid_job_is_refused() {
        assert!(NewApplication::parse(br#"{"job_id":"42"}"#).is_err());
        assert!(NewApplication::parse(br#"{"job_id":42}"#).is_err());
    }

    #[test]
    fn a_job_whose_title_or_company_would_break_an_email_header_is_refused() {
        for body in [
            r#"{"title":"Rust\r\nBcc: all@example.com","company":"c","location":"l","description":"d"}"#,
            r#"{"title":"t","company":"Acme\nX: y","location":"l","description":"d"}"#,
        ] {
            let err = NewJob::parse(body.as_bytes()).unwrap_err();
            assert!(err.0.contains("one line"), "{}", err.0);
        }
    }

    #[test]
    fn a_job_with_an_empty_title_is_refused() {
        let err = NewJob::parse(br#"{"title":" ","company":"c","location":"l","description":"d"}"#)
            .unwrap_err();
        assert!(err.0.contains("title"));
    }

    #[test]
    fn charges_take_a_bounded_positive_integer_and_an_iso_currency() {
        let ok = |b: &str| NewCharge::parse(b.as_bytes());
        assert!(ok(r#"{"amount_cents":1,"currency":"EUR","description":"d"}"#).is_ok());
        assert!(ok(r#"{"amount_cents":1000000000,"currency":"USD","description":"d"}"#).is_ok());
        // JSON Schema's integer: a number with no fractional part.
        let whole = ok(r#"{"amount_cents":245982.0,"currency":"EUR","description":"d"}"#);
        assert_eq!(whole.map(|c| c.amount_cents).ok(), Some(245982));
        for bad in [
            r#"{"amount_cents":1e300,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":18446744073709551615,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":0,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":-5,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":1000000001,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":10.5,"currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":"10","currency":"EUR","description":"d"}"#,
            r#"{"amount_cents":10,"currency":"eur","description":"d"}"#,
            r#"{"amount_cents":10,"currency":"ABC","description":"d"}"#,
            r#"{"amount_cents":10,"currency":"EUR"}"#,
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_parse_from_their_serde_names_only() {
        assert_eq!(parse_status("sent"), Some(EmailStatus::Sent));
        assert_eq!(parse_status("applied"), Some(LedgerStatus::Applied));
        assert_eq!(parse_status::<EmailStatus>("Sent"), None);
        assert_eq!(parse_status::<LedgerStatus>("sent"), None);
    }

    #[test]
    fn emails_are_checked_for_shape() {
        assert!(valid_email("a@b.co"));
        assert!(!valid_email("a@b"));
        assert!(!valid_email("a b@c.de"));
        assert!(!valid_email("@c.de"));
        assert!(!valid_email("a@@c.de"));
    }
}
