//! LedgerConsumer: applies each `charge.created` event to the ledger exactly
//! once.
//!
//! It reads the `charge.created` stream as this process's member of the
//! `ledger` consumer group (the shared pool of [`super::consumer`]). Its
//! side effect is local: [`Store::deliver_event`] writes the ledger entry,
//! the inbox row and the settling of the event in one transaction, so a
//! redelivered event (a relay that crashed between publish and mark, a
//! reclaimed entry, Redis losing its data) finds its inbox row and changes
//! nothing; the ledger's primary key on the charge is the last line of
//! defence. Counts `herald_ledger_entries_total`; the charge shows
//! `ledger_status` `applied` (or `dead` for an event it cannot apply).

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

#[cfg(doc)]
use super::consumer::ConsumerActor;
use super::consumer::{self, Handler};
use crate::broker::Delivery;
use crate::domain::topics;
use crate::store::{Consumer, DeliveryDecision, DeliveryStore, Effect};
use crate::telemetry::metrics as m;

/// The consumer's name in inboxes, dead letters, metrics and the group.
pub const CONSUMER: &str = "ledger";
/// What the store records for an applied charge: its ledger entry and
/// `ledger_status`.
pub const AS_STORED: Consumer = Consumer {
    name: CONSUMER,
    topic: topics::CHARGE_CREATED,
    effect: Effect::ChargeLedger,
};

/// Applies `charge.created` entries to the ledger: the handler of the
/// LedgerConsumer actor, a [`ConsumerActor`].
pub struct LedgerConsumer {
    store: Arc<dyn DeliveryStore>,
}

impl LedgerConsumer {
    pub fn new(store: Arc<dyn DeliveryStore>) -> LedgerConsumer {
        LedgerConsumer { store }
    }
}

/// Whether an event carries what the ledger needs; the entry itself is
/// written from the charge row, in the settling transaction.
fn check_charge(payload: &serde_json::Value) -> DeliveryDecision {
    let amount = payload["amount_cents"].as_i64().filter(|a| *a > 0);
    let currency = payload["currency"].as_str().filter(|c| c.len() == 3);
    match (amount, currency) {
        (Some(_), Some(_)) => DeliveryDecision::Done,
        _ => DeliveryDecision::Dead {
            error: "charge.created without a positive amount_cents and a currency".into(),
        },
    }
}

impl Handler for LedgerConsumer {
    fn consumer(&self) -> &'static str {
        CONSUMER
    }

    fn topic(&self) -> &'static str {
        AS_STORED.topic
    }

    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, bool> {
        async move {
            let envelope = &delivery.envelope;
            let deliver = |attempts: i32| {
                let payload = envelope.payload.clone();
                async move {
                    m::delivery_attempt(CONSUMER, attempts + 1);
                    check_charge(&payload)
                }
                .boxed()
            };
            let outcome = self
                .store
                .deliver_event(AS_STORED, envelope, &deliver)
                .await;
            consumer::settle(CONSUMER, envelope.event_id, outcome, m::ledger_entry)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_event_without_amount_or_currency_is_dead_not_retried() {
        let ok = serde_json::json!({"amount_cents": 1200, "currency": "EUR"});
        assert!(matches!(check_charge(&ok), DeliveryDecision::Done));
        for bad in [
            serde_json::json!({"currency": "EUR"}),
            serde_json::json!({"amount_cents": 0, "currency": "EUR"}),
            serde_json::json!({"amount_cents": 5}),
        ] {
            assert!(
                matches!(check_charge(&bad), DeliveryDecision::Dead { .. }),
                "{bad}"
            );
        }
    }
}
