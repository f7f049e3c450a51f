//! RetryBudget: one token bucket ([`TokenBucket`]) per outbound call site.
//!
//! A *retry* (not a first attempt) must take a token. A success puts back a
//! fraction of one, and the bucket also refills slowly with time, so deferred
//! deliveries get through eventually even when no new traffic succeeds. With
//! no token the delivery is deferred (rescheduled, no attempt spent), never
//! retried at once and never dead-lettered for lack of budget: a downstream
//! outage costs at most the bucket plus its slow refill in calls, instead of
//! every queued delivery retrying on its own schedule (a retry storm).
//!
//! The actor owns the buckets and exports `herald_retry_budget_tokens
//! {call_site}`. Callers ask through [`RetryBudgetHandle`], which goes
//! through the actor's mailbox (deliveries are few; a hop is cheap here).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::ActorSlot;
use crate::rate::TokenBucket;
use crate::telemetry::metrics as m;

/// The tokens of every call site as last seen by the actor, for
/// `/admin/status`.
pub type TokensView = Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>>>;

/// Shape of every bucket.
#[derive(Debug, Clone)]
pub struct RetryBudgetArgs {
    /// Tokens a bucket holds when full (and starts with).
    pub capacity: f64,
    /// Tokens one success puts back.
    pub refill_per_success: f64,
    /// Tokens the bucket regains per second on its own.
    pub refill_per_sec: f64,
    /// Where the actor publishes the token counts.
    pub view: TokensView,
}

impl Default for RetryBudgetArgs {
    fn default() -> Self {
        // A success puts back a tenth of the bucket (one token, what a
        // successful retry took), so once the downstream recovers, deferred
        // deliveries drain at the pool's pace; during an outage only the
        // slow refill lets retries through: at most 10 + 0.5/s of them.
        RetryBudgetArgs {
            capacity: 10.0,
            refill_per_success: 1.0,
            refill_per_sec: 0.5,
            view: TokensView::default(),
        }
    }
}

impl RetryBudgetArgs {
    /// A call site's bucket: `capacity` tokens, refilled at
    /// `refill_per_sec`, full to start with (a success deposits
    /// `refill_per_success`). The daemon's and the client's budgets alike.
    pub fn bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket::new(self.refill_per_sec, self.capacity, now)
    }
}

pub enum RetryBudgetMsg {
    /// May a retry at this call site run now? Takes a token if so.
    TryRetry(&'static str, RpcReplyPort<bool>),
    /// A call at this call site succeeded.
    Succeeded(&'static str),
}

pub struct RetryBudget;

pub struct RetryBudgetState {
    args: RetryBudgetArgs,
    buckets: HashMap<&'static str, TokenBucket>,
}

impl RetryBudgetState {
    fn bucket(&mut self, call_site: &'static str, now: Instant) -> &mut TokenBucket {
        let args = &self.args;
        self.buckets
            .entry(call_site)
            .or_insert_with(|| args.bucket(now))
    }
}

impl Actor for RetryBudget {
    type Msg = RetryBudgetMsg;
    type State = RetryBudgetState;
    type Arguments = RetryBudgetArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RetryBudgetArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RetryBudgetState {
            args,
            buckets: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        let args = state.args.clone();
        let (call_site, tokens) = match message {
            RetryBudgetMsg::TryRetry(call_site, reply) => {
                let bucket = state.bucket(call_site, now);
                let granted = bucket.try_take(1.0, now).is_ok();
                let _ = reply.send(granted);
                (call_site, bucket.tokens(now))
            }
            RetryBudgetMsg::Succeeded(call_site) => {
                let bucket = state.bucket(call_site, now);
                bucket.deposit(args.refill_per_success, now);
                (call_site, bucket.tokens(now))
            }
        };
        m::retry_budget_tokens(call_site, tokens);
        if let Ok(mut view) = args.view.lock() {
            view.insert(call_site, tokens);
        }
        Ok(())
    }
}

/// The consumers' way to the RetryBudget.
#[derive(Clone)]
pub struct RetryBudgetHandle {
    /// The running actor (refilled by the supervisor on restart).
    slot: Arc<ActorSlot<RetryBudgetMsg>>,
    /// The actor's published token counts.
    view: TokensView,
}

impl RetryBudgetHandle {
    pub fn new(slot: Arc<ActorSlot<RetryBudgetMsg>>, view: TokensView) -> Self {
        RetryBudgetHandle { slot, view }
    }

    /// Tokens per call site, as of the last retry or success there.
    pub fn tokens(&self) -> std::collections::BTreeMap<&'static str, f64> {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Whether a retry at `call_site` may run now. While the actor is being
    /// restarted the answer is no: the delivery is deferred, not lost.
    pub async fn try_retry(&self, call_site: &'static str) -> bool {
        let Some(actor) = self.slot.get() else {
            return false;
        };
        let asked = actor.call(
            |reply| RetryBudgetMsg::TryRetry(call_site, reply),
            Some(Duration::from_secs(2)),
        );
        matches!(asked.await, Ok(ractor::rpc::CallResult::Success(true)))
    }

    pub fn succeeded(&self, call_site: &'static str) {
        if let Some(actor) = self.slot.get() {
            let _ = actor.cast(RetryBudgetMsg::Succeeded(call_site));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_grants_its_capacity_then_a_token_per_success_or_refill() {
        let args = RetryBudgetArgs {
            capacity: 3.0,
            refill_per_success: 0.5,
            refill_per_sec: 1.0,
            view: TokensView::default(),
        };
        let mut state = RetryBudgetState {
            args: args.clone(),
            buckets: HashMap::new(),
        };
        let t0 = Instant::now();
        let bucket = state.bucket("resend", t0);
        let granted = (0..10).filter(|_| bucket.try_take(1.0, t0).is_ok()).count();
        assert_eq!(granted, 3);
        // Two successes make one token; time adds one per second.
        bucket.deposit(args.refill_per_success, t0);
        bucket.deposit(args.refill_per_success, t0);
        assert!(bucket.try_take(1.0, t0).is_ok());
        assert!(bucket.try_take(1.0, t0).is_err());
        assert!(bucket.try_take(1.0, t0 + Duration::from_secs(1)).is_ok());
        // Another call site has its own bucket.
        assert!(state.bucket("other", t0).try_take(1.0, t0).is_ok());
    }
}
