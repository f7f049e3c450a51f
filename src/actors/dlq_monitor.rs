//! DlqMonitor: watches the dead letters and pages through Sentry.
//!
//! Every `dlq.check_interval_ms` it reads depth and oldest age per topic and
//! exports `herald_dlq_depth`. A topic whose depth exceeds
//! `dlq.alert_threshold`, or whose oldest letter is older than
//! `dlq.alert_max_age_secs`, raises **one** Sentry event on the rising edge
//! (error level, message naming the dead letters, fingerprint
//! `["herald-dlq", topic]` so Sentry groups every alert of a topic into one
//! issue); more letters while it is raised raise nothing new. When the topic
//! drains below both limits, the resolution is logged. The event carries the
//! topic, the depth and the age, never an address, payload or token.
//!
//! The alert state is per process and not persisted: a restarted process
//! alerts again for a topic still over its limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{error, info, warn};

use super::periodic::{Every, Periodic};
use crate::store::{DeadLetterStore, DlqTopicStats};
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct DlqMonitorArgs {
    pub store: Arc<dyn DeadLetterStore>,
    /// Alert when a topic holds more than this many open dead letters.
    pub threshold: i64,
    /// Alert when a topic's oldest open dead letter is older than this.
    pub max_age: Duration,
    pub interval: Duration,
}

/// The DLQ monitor: a [`Check`] every `dlq.check_interval_ms`, and at start.
pub type DlqMonitor = Every<Check>;

/// One check, and the alerts raised so far.
pub struct Check {
    args: DlqMonitorArgs,
    /// Topics whose alert is raised.
    raised: HashMap<String, DlqTopicStats>,
}

impl Check {
    fn over_limits(&self, stats: &DlqTopicStats) -> bool {
        stats.depth > self.args.threshold
            || stats.oldest_age_seconds > self.args.max_age.as_secs_f64()
    }
}

/// The Sentry event of a rising edge.
fn alert_event(stats: &DlqTopicStats) -> sentry::protocol::Event<'static> {
    let mut extra = sentry::protocol::Map::new();
    extra.insert("topic".into(), stats.topic.clone().into());
    extra.insert("depth".into(), stats.depth.into());
    extra.insert(
        "oldest_age_seconds".into(),
        stats.oldest_age_seconds.round().into(),
    );
    sentry::protocol::Event {
        level: sentry::Level::Error,
        message: Some(format!(
            "dead letter alert: {} has {} dead letter(s), oldest {:.0} s",
            stats.topic, stats.depth, stats.oldest_age_seconds
        )),
        fingerprint: vec!["herald-dlq".into(), stats.topic.clone().into()].into(),
        logger: Some("herald.dlq_monitor".into()),
        tags: [("topic".to_string(), stats.topic.clone())]
            .into_iter()
            .collect(),
        extra,
        ..Default::default()
    }
}

#[async_trait]
impl Periodic for Check {
    type Args = DlqMonitorArgs;
    const AT_START: bool = true;

    fn period(args: &DlqMonitorArgs) -> Option<Duration> {
        Some(args.interval)
    }

    fn start(args: DlqMonitorArgs) -> Self {
        Check {
            args,
            raised: HashMap::new(),
        }
    }

    async fn run(&mut self) {
        let state = self;
        let stats = match state.args.store.dlq_stats().await {
            Ok(stats) => stats,
            Err(e) => {
                warn!(error = %e, "DLQ check failed; alerts unchanged");
                return;
            }
        };
        m::dlq_depth(stats.iter().map(|s| s.depth).sum());
        for topic_stats in &stats {
            let over = state.over_limits(topic_stats);
            let raised = state.raised.contains_key(&topic_stats.topic);
            if over && !raised {
                error!(
                    topic = %topic_stats.topic,
                    depth = topic_stats.depth,
                    oldest_age_seconds = topic_stats.oldest_age_seconds,
                    "dead letter alert raised"
                );
                sentry::capture_event(alert_event(topic_stats));
                state
                    .raised
                    .insert(topic_stats.topic.clone(), topic_stats.clone());
            } else if !over && raised {
                state.raised.remove(&topic_stats.topic);
                info!(topic = %topic_stats.topic, depth = topic_stats.depth, "dead letter alert resolved");
            }
        }
        // Topics that drained completely no longer appear in the stats.
        let drained: Vec<String> = state
            .raised
            .keys()
            .filter(|t| !stats.iter().any(|s| &s.topic == *t))
            .cloned()
            .collect();
        for topic in drained {
            state.raised.remove(&topic);
            info!(%topic, depth = 0, "dead letter alert resolved");
        }
    }
}
