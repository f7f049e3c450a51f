//! A job's life: posted open, edited, closed; and the filters a reader of the
//! list applies to it.
//!
//! Every rule here is a plain function both backends and the stream share:
//! what an edit or a close changes ([`JobChange::apply`]), when it is a
//! change at all (a job's `version` counts changes, so an edit that changes
//! nothing is not one), and whether a job matches a filter
//! ([`JobFilter::matches`]). The database keeps the lowercased texts a filter
//! compares ([`SearchKeys`]), computed here, so `GET /api/jobs?q=…` and the
//! filtered stream agree to the letter on either backend.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{optional_text, parse_json, required_line, required_text, InvalidBody};

/// Whether a job takes applications and shows in the list.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Open,
    Closed,
}

impl JobStatus {
    /// As stored and as the API shows it.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Open => "open",
            JobStatus::Closed => "closed",
        }
    }
}

/// A posted job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub title: String,
    pub company: String,
    pub location: String,
    pub description: String,
    pub posted_at: DateTime<Utc>,
    pub status: JobStatus,
    /// 1 when posted, +1 on every change (an edit that changes a field, a close).
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl Job {
    /// The texts a filter compares, lowercased once.
    pub fn search_keys(&self) -> SearchKeys {
        search_keys(
            &self.title,
            &self.company,
            &self.location,
            &self.description,
        )
    }
}

/// A job's [`SearchKeys`] from its four texts.
pub fn search_keys(title: &str, company: &str, location: &str, description: &str) -> SearchKeys {
    SearchKeys {
        text: [title, company, description]
            .map(str::to_lowercase)
            .join(SearchKeys::SEPARATOR),
        location: location.to_lowercase(),
        company: company.to_lowercase(),
    }
}

/// What a job's filters compare, stored beside the job (`search_text`,
/// `location_key`, `company_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchKeys {
    /// Title, company and description, lowercased, joined by [`Self::SEPARATOR`].
    pub text: String,
    pub location: String,
    pub company: String,
}

impl SearchKeys {
    /// Between the fields of `text`: a control character `q` may not hold,
    /// so no match spans two fields.
    pub const SEPARATOR: &'static str = "\u{1f}";
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJobBody {
    title: String,
    company: String,
    location: String,
    description: String,
}

/// A validated job to post.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub title: String,
    pub company: String,
    pub location: String,
    pub description: String,
}

impl NewJob {
    pub fn parse(body: &[u8]) -> Result<NewJob, InvalidBody> {
        let raw: NewJobBody = parse_json(body)?;
        Ok(NewJob {
            title: required_line("title", raw.title, 200)?,
            company: required_line("company", raw.company, 200)?,
            location: required_text("location", raw.location, 200)?,
            description: required_text("description", raw.description, 20_000)?,
        })
    }

    /// The job, posted at `posted_at` to the microsecond (as stored).
    pub fn into_job(self, id: Uuid, posted_at: DateTime<Utc>) -> Job {
        let posted_at = chrono::SubsecRound::trunc_subsecs(posted_at, 6);
        Job {
            id,
            title: self.title,
            company: self.company,
            location: self.location,
            description: self.description,
            posted_at,
            status: JobStatus::Open,
            version: 1,
            updated_at: posted_at,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobPatchBody {
    #[serde(default, deserialize_with = "present")]
    title: Option<String>,
    #[serde(default, deserialize_with = "present")]
    company: Option<String>,
    #[serde(default, deserialize_with = "present")]
    location: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<String>,
}

/// A field an edit names must hold a string: `null` would mean "remove it",
/// and a job's texts are all required ("invalid type: null, expected a string").
fn present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<String>, D::Error> {
    String::deserialize(value).map(Some)
}

/// A validated edit: any subset of the four texts, each checked as when
/// posting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPatch {
    pub title: Option<String>,
    pub company: Option<String>,
    pub location: Option<String>,
    pub description: Option<String>,
}

impl JobPatch {
    pub fn parse(body: &[u8]) -> Result<JobPatch, InvalidBody> {
        let raw: JobPatchBody = parse_json(body)?;
        let patch = JobPatch {
            title: raw
                .title
                .map(|v| required_line("title", v, 200))
                .transpose()?,
            company: raw
                .company
                .map(|v| required_line("company", v, 200))
                .transpose()?,
            location: raw
                .location
                .map(|v| required_text("location", v, 200))
                .transpose()?,
            description: raw
                .description
                .map(|v| required_text("description", v, 20_000))
                .transpose()?,
        };
        if patch == JobPatch::default() {
            return Err(InvalidBody(
                "an edit names at least one of `title`, `company`, `location`, `description`"
                    .into(),
            ));
        }
        Ok(patch)
    }
}

/// What an admin does to a posted job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobChange {
    Edit(JobPatch),
    Close,
}

/// Why a change is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeRefused {
    /// An edit of a closed job (a closed job is final; closing it again is
    /// not refused, it changes nothing).
    Closed,
}

impl JobChange {
    /// The job after the change, at `now`: `Ok(None)` when it changes
    /// nothing (an edit to the values the job already has, closing a closed
    /// job), so no version is spent and no event is sent.
    pub fn apply(&self, job: &Job, now: DateTime<Utc>) -> Result<Option<Job>, ChangeRefused> {
        let mut next = job.clone();
        match self {
            JobChange::Edit(_) if job.status == JobStatus::Closed => {
                return Err(ChangeRefused::Closed)
            }
            JobChange::Edit(patch) => {
                let fields = [
                    (&mut next.title, &patch.title),
                    (&mut next.company, &patch.company),
                    (&mut next.location, &patch.location),
                    (&mut next.description, &patch.description),
                ];
                for (field, value) in fields {
                    if let Some(value) = value {
                        field.clone_from(value);
                    }
                }
            }
            JobChange::Close => next.status = JobStatus::Closed,
        }
        if next == *job {
            return Ok(None);
        }
        next.version = job.version + 1;
        next.updated_at = now.max(job.updated_at);
        Ok(Some(next))
    }

    /// The topic of the event a change that changed something emits.
    pub fn topic(&self) -> &'static str {
        match self {
            JobChange::Edit(_) => super::topics::JOB_UPDATED,
            JobChange::Close => super::topics::JOB_CLOSED,
        }
    }
}

/// A reader's filter, the same on `GET /api/jobs` and `GET /api/jobs/stream`:
/// `q` a case-insensitive substring of the title, company or description;
/// `location` and `company` case-insensitive equality; all that are given
/// must hold. Kept lowercased.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct JobFilter {
    pub q: Option<String>,
    pub location: Option<String>,
    pub company: Option<String>,
}

impl JobFilter {
    /// The filter of a list or stream query string (form-urlencoded): `q`,
    /// `location`, `company`; other names are the caller's.
    pub fn from_query(query: &str) -> Result<JobFilter, InvalidBody> {
        JobFilter::from_pairs(
            form_urlencoded::parse(query.as_bytes()).map(|(n, v)| (n, v.into_owned())),
        )
    }

    /// Takes `q`, `location` and `company` from a query string's pairs
    /// (percent-decoded by the caller); other names are the caller's.
    pub fn from_pairs<N: AsRef<str>>(
        pairs: impl IntoIterator<Item = (N, String)>,
    ) -> Result<JobFilter, InvalidBody> {
        let mut filter = JobFilter::default();
        for (name, value) in pairs {
            let name = name.as_ref();
            let slot = match name {
                "q" => &mut filter.q,
                "location" => &mut filter.location,
                "company" => &mut filter.company,
                _ => continue,
            };
            if value.chars().count() > 200 {
                return Err(InvalidBody(format!(
                    "`{name}` must be at most 200 characters"
                )));
            }
            if value.chars().any(char::is_control) {
                return Err(InvalidBody(format!(
                    "`{name}` must not contain control characters"
                )));
            }
            // An empty value filters nothing (a cleared search box).
            *slot = optional_text(name, Some(value.to_lowercase()), 200)?.filter(|v| !v.is_empty());
        }
        Ok(filter)
    }

    pub fn is_empty(&self) -> bool {
        *self == JobFilter::default()
    }

    /// `q` as a LIKE pattern that matches where `q` occurs (`%`, `_` and
    /// `\` escaped by `\`): the same test as [`Self::matches`], in a form
    /// an index answers (Postgres' trigram index, migrations/postgres/0012),
    /// and the cheaper test on SQLite.
    pub fn q_like_pattern(&self) -> Option<String> {
        self.q.as_ref().map(|q| {
            let mut pattern = String::with_capacity(q.len() + 2);
            pattern.push('%');
            for c in q.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(c);
            }
            pattern.push('%');
            pattern
        })
    }

    /// `q` as an FTS5 phrase (in double quotes, a quote doubled) for the
    /// trigram index of SQLite (migrations/sqlite/0008), when it is long
    /// enough for one: a trigram index finds nothing shorter than three
    /// characters, and such a `q` is matched by scanning.
    pub fn q_trigram_phrase(&self) -> Option<String> {
        self.q
            .as_ref()
            .filter(|q| q.chars().count() >= 3)
            .map(|q| format!("\"{}\"", q.replace('"', "\"\"")))
    }

    /// Whether an open job with these keys is on this filter's list.
    pub fn matches(&self, keys: &SearchKeys) -> bool {
        self.q
            .as_ref()
            .is_none_or(|q| keys.text.contains(q.as_str()))
            && self.location.as_ref().is_none_or(|l| keys.location == *l)
            && self.company.as_ref().is_none_or(|c| keys.company == *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_q_is_searched_as_itself_whatever_it_holds() {
        let filter = |q: &str| JobFilter::from_query(&format!("q={q}")).unwrap();
        assert_eq!(filter("Rust").q_like_pattern().unwrap(), "%rust%");
        assert_eq!(
            filter("100%25_a%5Cb").q_like_pattern().unwrap(),
            "%100\\%\\_a\\\\b%"
        );
        assert_eq!(filter("rust").q_trigram_phrase().unwrap(), "\"rust\"");
        assert_eq!(filter("a%22b").q_trigram_phrase().unwrap(), "\"a\"\"b\"");
        assert_eq!(
            filter("go").q_trigram_phrase(),
            None,
            "too short for trigrams"
        );
        assert_eq!(JobFilter::default().q_like_pattern(), None);
    }

    fn job() -> Job {
        NewJob {
            title: "Rust Engineer".into(),
            company: "Acme".into(),
            location: "Berlin".into(),
            description: "Streams".into(),
        }
        .into_job(Uuid::now_v7(), Utc::now())
    }

    #[test]
    fn an_edit_spends_a_version_only_when_it_changes_something() {
        let job = job();
        let same = JobChange::Edit(JobPatch {
            title: Some(job.title.clone()),
            ..JobPatch::default()
        });
        assert_eq!(same.apply(&job, Utc::now()), Ok(None));
        let moved = JobChange::Edit(JobPatch {
            location: Some("Paris".into()),
            ..JobPatch::default()
        })
        .apply(&job, Utc::now())
        .unwrap()
        .unwrap();
        assert_eq!((moved.location.as_str(), moved.version), ("Paris", 2));
        assert_eq!(moved.title, job.title);
        let closed = JobChange::Close.apply(&moved, Utc::now()).unwrap().unwrap();
        assert_eq!((closed.status, closed.version), (JobStatus::Closed, 3));
        assert_eq!(JobChange::Close.apply(&closed, Utc::now()), Ok(None));
        assert_eq!(
            moved_again(&closed),
            Err(ChangeRefused::Closed),
            "a closed job is final"
        );
    }

    fn moved_again(job: &Job) -> Result<Option<Job>, ChangeRefused> {
        JobChange::Edit(JobPatch {
            location: Some("Rome".into()),
            ..JobPatch::default()
        })
        .apply(job, Utc::now())
    }

    #[test]
    fn an_empty_or_multi_line_edit_is_refused() {
        assert!(JobPatch::parse(b"{}").is_err());
        assert!(JobPatch::parse(br#"{"title":"a\nb"}"#).is_err());
        assert!(JobPatch::parse(br#"{"salary":1}"#).is_err());
        assert!(JobPatch::parse(br#"{"location":" "}"#).is_err());
        let null = JobPatch::parse(br#"{"title":"t","description":null}"#).unwrap_err();
        assert!(null.0.contains("null"), "{}", null.0);
        assert_eq!(
            JobPatch::parse(br#"{"company":"Initech"}"#)
                .unwrap()
                .company,
            Some("Initech".into())
        );
    }

    #[test]
    fn a_filter_is_case_insensitive_and_every_part_must_hold() {
        let keys = job().search_keys();
        let filter = |pairs: &[(&'static str, &str)]| {
            JobFilter::from_pairs(pairs.iter().map(|(n, v)| (*n, v.to_string()))).unwrap()
        };
        assert!(filter(&[]).matches(&keys));
        assert!(filter(&[("q", "RUST eng")]).matches(&keys));
        assert!(filter(&[("q", "stream"), ("location", "berlin")]).matches(&keys));
        assert!(!filter(&[("q", "stream"), ("location", "Paris")]).matches(&keys));
        assert!(!filter(&[("location", "berl")]).matches(&keys), "equality");
        assert!(filter(&[("company", "ACME")]).matches(&keys));
        assert!(
            !filter(&[("q", "engineeracme")]).matches(&keys),
            "no match across two fields"
        );
        assert!(JobFilter::from_pairs([("q", "a\u{1f}b".to_string())]).is_err());
        assert!(filter(&[("q", "")]).is_empty());
    }
}
