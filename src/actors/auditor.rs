//! Auditor: checks, on a schedule, that the effectively-once guarantees
//! hold in the database itself — not in Herald's idea of what it did.
//!
//! Each audit ([`Store::audit`]) counts the rows breaking each
//! [`Invariant`]: an application with two sent emails, a charge with two
//! ledger entries, an event settled with neither its effect nor its dead
//! letter, an event unsettled past `audit.max_unsettled_age_secs`. The
//! counts go to `herald_audit_violations{invariant}` (0 is the only healthy
//! value), and an invariant going from holding to broken raises one Sentry
//! event (a rising edge; it stays quiet while the count stays up). `herald
//! audit` runs the same checks once and exits non-zero on any violation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{error, warn};

use super::periodic::{Every, Periodic};
use crate::store::{Invariant, MaintenanceStore};
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct AuditorArgs {
    pub store: Arc<dyn MaintenanceStore>,
    pub interval: Duration,
    pub max_unsettled_age: Duration,
    /// The janitor's retention: older settled events have lost their inbox rows.
    pub retention: Duration,
    /// The last audit's result, for `/admin/status` and the admin page.
    pub last: LastAudit,
}

/// The result of the last audit that completed (`None` before the first).
pub type LastAudit = Arc<std::sync::Mutex<Option<AuditResult>>>;

/// One completed audit: when, and the rows breaking each invariant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditResult {
    pub at: chrono::DateTime<chrono::Utc>,
    pub violations: std::collections::BTreeMap<&'static str, i64>,
}

/// The auditor: an [`Audit`] every `audit.interval_ms`, and at start.
pub type Auditor = Every<Audit>;

/// One audit, and the counts of the last one.
pub struct Audit {
    args: AuditorArgs,
    /// The last count per invariant, for the rising edge.
    last: HashMap<&'static str, i64>,
}

/// The Sentry event of an invariant that just broke.
fn alert_event(invariant: Invariant, rows: i64) -> sentry::protocol::Event<'static> {
    sentry::protocol::Event {
        level: sentry::Level::Error,
        message: Some(format!(
            "audit: invariant {} broken by {rows} row(s)",
            invariant.name()
        )),
        fingerprint: vec!["herald-audit".into(), invariant.name().into()].into(),
        logger: Some("herald.auditor".into()),
        tags: [("invariant".to_string(), invariant.name().to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

#[async_trait]
impl Periodic for Audit {
    type Args = AuditorArgs;
    const AT_START: bool = true;

    fn period(args: &AuditorArgs) -> Option<Duration> {
        Some(args.interval)
    }

    fn start(args: AuditorArgs) -> Self {
        for invariant in Invariant::ALL {
            m::audit_violations(invariant.name(), 0);
        }
        Audit {
            args,
            last: HashMap::new(),
        }
    }

    async fn run(&mut self) {
        let args = &self.args;
        let found = match args
            .store
            .audit(&super::CONSUMERS, args.max_unsettled_age, args.retention)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "audit failed; the gauges keep their last values");
                return;
            }
        };
        m::audit_run();
        let result = AuditResult {
            at: chrono::Utc::now(),
            violations: found.iter().map(|(i, rows)| (i.name(), *rows)).collect(),
        };
        *args.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        for (invariant, rows) in found {
            m::audit_violations(invariant.name(), rows);
            let before = self.last.insert(invariant.name(), rows).unwrap_or(0);
            if rows > 0 && before == 0 {
                error!(
                    invariant = invariant.name(),
                    rows, "audit: invariant broken"
                );
                sentry::capture_event(alert_event(invariant, rows));
            }
        }
    }
}
