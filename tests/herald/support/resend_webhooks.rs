//! The webhook side of the fake Resend: what happened to an email after it
//! was accepted, posted to a receiver the way Resend does (through Svix):
//!
//! - a JSON body `{"type": "email.bounced", "created_at", "data": {"email_id",
//!   "to", "subject", "bounce": {...}}}`;
//! - `svix-id` (the message's id, the same on every attempt),
//!   `svix-timestamp` (the attempt's Unix seconds) and `svix-signature`: a
//!   space-separated list of `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
//!   one per signing secret (two while a secret rotates);
//! - any answer but 2xx (or no answer) is retried on a schedule (Resend's is
//!   5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; here the same shape in
//!   seconds), then given up.
//!
//! The signature is computed here with `hmac` and `sha2`, not with the
//! verifier Herald uses, so a test of one against the other means something.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// The signing secret Herald is configured with in the tests.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Another, for rotation and forgery tests.
pub const OTHER_SECRET: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXk=";

/// The base64 signature of `body` as Svix computes it: HMAC-SHA256 under the
/// key after `whsec_`, over `{id}.{timestamp}.{body}`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `svix-signature` for `secrets`: `v1,<sig>` each, space-separated.
pub fn signature_header(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| format!("v1,{}", sign(s, id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// A webhook event's body, as Resend sends it.
pub fn event_body(kind: &str, email_id: &str, to: &str, extra: Value) -> Vec<u8> {
    let mut data = json!({
        "created_at": "2026-12-06T10:00:00.000Z",
        "email_id": email_id,
        "from": "Herald Jobs <jobs@herald.test>",
        "to": [to],
        "subject": "Your application",
    });
    if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            data.insert(k.clone(), v.clone());
        }
    }
    json!({ "type": kind, "created_at": "2026-12-06T10:00:01.000Z", "data": data })
        .to_string()
        .into_bytes()
}

/// One message and its delivery attempts.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub kind: String,
    pub email_id: String,
    pub body: Vec<u8>,
    /// Each attempt's status, or 0 when nothing answered.
    pub attempts: Vec<u16>,
    /// A 2xx came back.
    pub delivered: bool,
    /// The schedule ran out.
    pub given_up: bool,
}

/// Where and how webhooks go.
pub struct Sender {
    /// The receiver's URL (`http://…/webhooks/resend`), when set.
    pub target: Option<String>,
    /// The secrets each message is signed with.
    pub secrets: Vec<String>,
    /// The pause before each retry.
    pub schedule: Vec<Duration>,
    pub messages: Vec<Message>,
}

impl Default for Sender {
    fn default() -> Self {
        Sender {
            target: None,
            secrets: vec![WEBHOOK_SECRET.to_string()],
            // Resend's 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, shrunk:
            // about a minute in all, past any outage a test makes.
            schedule: [200, 500, 1000, 2000, 5000, 10_000, 20_000, 30_000]
                .map(Duration::from_millis)
                .to_vec(),
            messages: Vec::new(),
        }
    }
}

/// Posts message `index` of `sender` until a 2xx or the schedule runs out
/// (the caller's task; the fake spawns one per message).
pub async fn deliver(sender: Arc<Mutex<Sender>>, index: usize) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("webhook client");
    let mut pauses = sender.lock().unwrap().schedule.clone().into_iter();
    loop {
        let (target, secrets, id, body) = {
            let s = sender.lock().unwrap();
            let m = &s.messages[index];
            (
                s.target.clone(),
                s.secrets.clone(),
                m.id.clone(),
                m.body.clone(),
            )
        };
        let status = match target {
            Some(url) => {
                let timestamp = now_secs();
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                client
                    .post(url)
                    .header("content-type", "application/json")
                    .header("svix-id", &id)
                    .header("svix-timestamp", timestamp.to_string())
                    .header(
                        "svix-signature",
                        signature_header(&secrets, &id, timestamp, &body),
                    )
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
            None => 0,
        };
        let done = (200..300).contains(&status);
        {
            let mut s = sender.lock().unwrap();
            let m = &mut s.messages[index];
            m.attempts.push(status);
            m.delivered |= done;
        }
        if done {
            return;
        }
        match pauses.next() {
            // The schedule of a real sender: the behaviour this double
            // offers, not a synchronisation.
            Some(pause) => tokio::time::sleep(pause).await,
            None => {
                sender.lock().unwrap().messages[index].given_up = true;
                return;
            }
        }
    }
}
