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

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{error, info, warn};

use crate::store::{DlqTopicStats, Store};
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct DlqMonitorArgs {
    pub store: Arc<dyn Store>,
    /// Alert when a topic holds more than this many open dead letters.
    pub threshold: i64,
    /// Alert when a topic's oldest open dead letter is older than this.
    pub max_age: Duration,
    pub interval: Duration,
}

pub enum DlqMonitorMsg {
    Check,
}

pub struct DlqMonitor;

pub struct DlqMonitorState {
    args: DlqMonitorArgs,
    /// The schedule, stopped with the actor.
    _ticker: super::Ticker,
    /// Topics whose alert is raised.
    raised: HashMap<String, DlqTopicStats>,
}

impl DlqMonitorState {
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

impl Actor for DlqMonitor {
    type Msg = DlqMonitorMsg;
    type State = DlqMonitorState;
    type Arguments = DlqMonitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DlqMonitorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = super::Ticker::every(&myself, args.interval, || DlqMonitorMsg::Check);
        let _ = myself.cast(DlqMonitorMsg::Check);
        Ok(DlqMonitorState {
            args,
            _ticker: ticker,
            raised: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let DlqMonitorMsg::Check = message;
        let stats = match state.args.store.dlq_stats().await {
            Ok(stats) => stats,
            Err(e) => {
                warn!(error = %e, "DLQ check failed; alerts unchanged");
                return Ok(());
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
        Ok(())
    }
}
