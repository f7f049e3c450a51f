//! The email provider's reply to a batch is untrusted input: any status,
//! headers and body must classify without a panic, a success must name
//! every member exactly once (no email counts as sent unless the reply
//! named it), and no delay read from a reply may exceed the cap.
//!
//! Input: two bytes of status, one byte of batch size, then header lines
//! (`name: value`) up to an empty line, then the body.
#![no_main]

#[path = "../../src/email/reply.rs"]
#[allow(dead_code)]
mod reply;

use std::collections::HashSet;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use reply::{classify_batch_reply, MemberAnswer, SendError};

const MAX_DELAY: Duration = Duration::from_secs(600);

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 1000;
    let members = usize::from(data[2] % 101);
    let rest = &data[3..];
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (&rest[..0], rest),
    };
    let head = String::from_utf8_lossy(head);
    let headers: Vec<(&str, &str)> = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim(), v.trim()))
        .collect();
    match classify_batch_reply(status, &headers, body, members, MAX_DELAY) {
        Ok(answers) => {
            assert_eq!(answers.len(), members, "one answer per member");
            assert!(
                (200..300).contains(&status) || status == 409,
                "only a success (or a key accepted before) answers per member: {status}"
            );
            if (200..300).contains(&status) {
                let mut ids = HashSet::new();
                for answer in &answers {
                    if let MemberAnswer::Accepted { provider_id } = answer {
                        let id = provider_id.as_deref().expect("a success names its ids");
                        assert!(!id.is_empty());
                        assert!(ids.insert(id.to_string()), "an id names one email");
                    }
                }
            }
        }
        Err(SendError::RateLimited { retry_after, .. })
        | Err(SendError::Transient { retry_after, .. }) => {
            assert!(retry_after.is_none_or(|d| d <= MAX_DELAY), "{retry_after:?}");
        }
        Err(SendError::ReplyInvalid(_)) | Err(SendError::Permanent(_)) => {}
    }
});
