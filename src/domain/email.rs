//! An email's life after Herald hands it over, and what the provider's
//! reports (Resend's webhooks) may change of it.
//!
//! Two columns hold it: Herald's own `email_status` (`pending`, `sent`,
//! `dead`, `suppressed`: what the pipeline did) and the provider's
//! `email_report` (`delivered`, `bounced`, `complained`, `failed`,
//! `suppressed`: what became of a sent email). The API shows one status,
//! [`EmailStatus::shown`]. Keeping them apart means a report never touches
//! the pipeline's state (the sent-email counter, the auditor's checks, a
//! dead letter's replay), and a report can only follow `sent`.
//!
//! Reports arrive late, twice and out of order; [`next_report`] decides
//! once, for both backends, what one does to an email: a later report
//! replaces an earlier one only if it says more (a bounce or a complaint is
//! never undone by a `delivered` that arrives after it).

use serde::{Deserialize, Serialize};

/// An application's confirmation email, as the API shows it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmailStatus {
    /// Not sent yet (waiting its turn, or retrying).
    Pending,
    /// Accepted by the provider; nothing heard since.
    Sent,
    /// The recipient's server accepted it.
    Delivered,
    /// The recipient's server refused it.
    Bounced,
    /// The recipient marked it as spam.
    Complained,
    /// The provider could not send it.
    Failed,
    /// Not sent: the address is suppressed (it bounced or complained
    /// before), by Herald or by the provider.
    Suppressed,
    /// Herald gave up on it (a dead letter, for an operator).
    Dead,
}

/// What the provider reported about a sent email (`email_report`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmailReport {
    Delivered,
    Bounced,
    Complained,
    Failed,
    /// The provider did not send it: the address is on its suppression list.
    Suppressed,
}

impl EmailReport {
    /// Its `email_report` value.
    pub fn as_str(self) -> &'static str {
        match self {
            EmailReport::Delivered => "delivered",
            EmailReport::Bounced => "bounced",
            EmailReport::Complained => "complained",
            EmailReport::Failed => "failed",
            EmailReport::Suppressed => "suppressed",
        }
    }

    /// How much a report says: a report replaces another only with more.
    /// Delivered is the least; not reaching the inbox (bounced, failed,
    /// suppressed) outranks it; a complaint, which follows a delivery and
    /// is what harms a sending domain most, outranks everything.
    fn rank(self) -> u8 {
        match self {
            EmailReport::Delivered => 1,
            EmailReport::Bounced | EmailReport::Failed | EmailReport::Suppressed => 2,
            EmailReport::Complained => 3,
        }
    }
}

impl EmailStatus {
    /// The one status the API shows, from Herald's status and the
    /// provider's report: a report speaks only for a sent email.
    pub fn shown(self, report: Option<EmailReport>) -> EmailStatus {
        match (self, report) {
            (EmailStatus::Sent, Some(report)) => match report {
                EmailReport::Delivered => EmailStatus::Delivered,
                EmailReport::Bounced => EmailStatus::Bounced,
                EmailReport::Complained => EmailStatus::Complained,
                EmailReport::Failed => EmailStatus::Failed,
                EmailReport::Suppressed => EmailStatus::Suppressed,
            },
            (status, _) => status,
        }
    }
}

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// A permanent bounce: the address does not take mail.
    Bounced,
    /// The recipient marked a confirmation as spam.
    Complained,
    /// The provider refused to send to it (its own suppression list).
    ProviderSuppressed,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::Bounced => "bounced",
            SuppressionReason::Complained => "complained",
            SuppressionReason::ProviderSuppressed => "provider_suppressed",
        }
    }
}

/// What the provider said happened to one email (a verified webhook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailEvent {
    Delivered,
    /// Delivery is being retried by the provider: the email stays `sent`.
    DeliveryDelayed,
    Bounced {
        /// `bounce.type` is `Permanent`: the address is suppressed.
        permanent: bool,
    },
    Complained,
    Failed,
    Suppressed,
}

impl EmailEvent {
    /// The event a Resend webhook `type` names (`email.bounced`, …), with
    /// its `data.bounce.type`; `None` for a type that says nothing of an
    /// email's delivery (`email.sent`, `email.opened`, `contact.created`, …).
    pub fn of_resend(kind: &str, bounce_type: Option<&str>) -> Option<EmailEvent> {
        Some(match kind {
            "email.delivered" => EmailEvent::Delivered,
            "email.delivery_delayed" => EmailEvent::DeliveryDelayed,
            "email.bounced" => EmailEvent::Bounced {
                permanent: bounce_type.is_some_and(|t| t.eq_ignore_ascii_case("permanent")),
            },
            "email.complained" => EmailEvent::Complained,
            "email.failed" => EmailEvent::Failed,
            "email.suppressed" => EmailEvent::Suppressed,
            _ => return None,
        })
    }

    /// Its name where it is stored (`provider_events.event`).
    pub fn as_str(self) -> &'static str {
        match self {
            EmailEvent::Delivered => "delivered",
            EmailEvent::DeliveryDelayed => "delivery_delayed",
            EmailEvent::Bounced { permanent: true } => "bounced_permanent",
            EmailEvent::Bounced { permanent: false } => "bounced",
            EmailEvent::Complained => "complained",
            EmailEvent::Failed => "failed",
            EmailEvent::Suppressed => "suppressed",
        }
    }

    /// The event a stored name means.
    pub fn parse(name: &str) -> Option<EmailEvent> {
        [
            EmailEvent::Delivered,
            EmailEvent::DeliveryDelayed,
            EmailEvent::Bounced { permanent: true },
            EmailEvent::Bounced { permanent: false },
            EmailEvent::Complained,
            EmailEvent::Failed,
            EmailEvent::Suppressed,
        ]
        .into_iter()
        .find(|e| e.as_str() == name)
    }

    /// The report it makes, if any.
    fn report(self) -> Option<EmailReport> {
        match self {
            EmailEvent::Delivered => Some(EmailReport::Delivered),
            EmailEvent::DeliveryDelayed => None,
            EmailEvent::Bounced { .. } => Some(EmailReport::Bounced),
            EmailEvent::Complained => Some(EmailReport::Complained),
            EmailEvent::Failed => Some(EmailReport::Failed),
            EmailEvent::Suppressed => Some(EmailReport::Suppressed),
        }
    }

    /// Whether it suppresses the address, and why.
    pub fn suppresses(self) -> Option<SuppressionReason> {
        match self {
            EmailEvent::Bounced { permanent: true } => Some(SuppressionReason::Bounced),
            EmailEvent::Complained => Some(SuppressionReason::Complained),
            EmailEvent::Suppressed => Some(SuppressionReason::ProviderSuppressed),
            _ => None,
        }
    }
}

/// The report an email has after `event`, if it changes: `None` keeps
/// `current` (a `delivery_delayed`, a repeat, or a report that says less
/// than the one it has).
pub fn next_report(current: Option<EmailReport>, event: EmailEvent) -> Option<EmailReport> {
    let new = event.report()?;
    match current {
        Some(current) if current.rank() >= new.rank() => None,
        _ => Some(new),
    }
}

/// An address as suppressions compare it: trimmed, lowercased (domains
/// are case-insensitive, and so are the mailboxes of every provider that
/// matters), the same on both backends because it is computed here.
pub fn address_key(address: &str) -> String {
    address.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use EmailEvent as E;
    use EmailReport as R;

    #[test]
    fn a_later_report_replaces_an_earlier_one_only_with_more() {
        assert_eq!(next_report(None, E::Delivered), Some(R::Delivered));
        assert_eq!(next_report(None, E::DeliveryDelayed), None);
        let bounce = E::Bounced { permanent: true };
        assert_eq!(next_report(Some(R::Delivered), bounce), Some(R::Bounced));
        // A late `delivered` never undoes a bounce or a complaint.
        assert_eq!(next_report(Some(R::Bounced), E::Delivered), None);
        assert_eq!(next_report(Some(R::Complained), E::Delivered), None);
        assert_eq!(next_report(Some(R::Complained), bounce), None);
        assert_eq!(
            next_report(Some(R::Bounced), E::Complained),
            Some(R::Complained)
        );
        assert_eq!(next_report(Some(R::Delivered), E::Delivered), None);
    }

    #[test]
    fn only_a_permanent_bounce_a_complaint_or_the_providers_list_suppress() {
        assert_eq!(
            E::Bounced { permanent: true }.suppresses(),
            Some(SuppressionReason::Bounced)
        );
        assert_eq!(E::Bounced { permanent: false }.suppresses(), None);
        assert_eq!(
            E::Complained.suppresses(),
            Some(SuppressionReason::Complained)
        );
        assert_eq!(E::Delivered.suppresses(), None);
        assert_eq!(
            EmailEvent::of_resend("email.bounced", Some("Permanent")),
            Some(E::Bounced { permanent: true })
        );
        assert_eq!(
            EmailEvent::of_resend("email.bounced", Some("Transient")),
            Some(E::Bounced { permanent: false })
        );
        assert_eq!(EmailEvent::of_resend("email.opened", None), None);
        for event in [
            E::Delivered,
            E::DeliveryDelayed,
            E::Bounced { permanent: true },
            E::Bounced { permanent: false },
            E::Complained,
            E::Failed,
            E::Suppressed,
        ] {
            assert_eq!(EmailEvent::parse(event.as_str()), Some(event));
        }
    }

    #[test]
    fn a_report_shows_only_over_a_sent_email() {
        assert_eq!(
            EmailStatus::Sent.shown(Some(R::Bounced)),
            EmailStatus::Bounced
        );
        assert_eq!(EmailStatus::Sent.shown(None), EmailStatus::Sent);
        assert_eq!(EmailStatus::Suppressed.shown(None), EmailStatus::Suppressed);
        assert_eq!(
            EmailStatus::Dead.shown(Some(R::Delivered)),
            EmailStatus::Dead
        );
        assert_eq!(address_key(" Ada@Example.COM "), "ada@example.com");
    }
}
