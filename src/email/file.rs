//! The `file` transport (the dev default): one `.eml` file per email under
//! `<state_dir>/mail/`, named after the event id, so a repeated send of the
//! same event rewrites the same file instead of adding a second one.

use std::path::PathBuf;

use uuid::Uuid;

use super::{BatchAnswers, Email, MemberAnswer, SendError, Transport};

pub struct FileTransport {
    /// Directory the `.eml` files are written to.
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: PathBuf) -> std::io::Result<FileTransport> {
        std::fs::create_dir_all(&dir)?;
        Ok(FileTransport { dir })
    }
}

/// An RFC 5322 message with a plain-text body.
fn render(email: &Email, id: Uuid) -> String {
    format!(
        "Date: {}\r\nFrom: {}\r\nTo: {}\r\nSubject: {}\r\nMessage-ID: <{id}@herald>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}",
        chrono::Utc::now().to_rfc2822(),
        email.from,
        email.to,
        email.subject,
        email.text.replace('\n', "\r\n")
    )
}

impl FileTransport {
    /// Writes one message, named after its event id.
    async fn write(&self, email: &Email, event_id: Uuid) -> Result<(), SendError> {
        let path = self.dir.join(format!("{event_id}.eml"));
        let partial = self.dir.join(format!(".{event_id}.eml.partial"));
        let body = render(email, event_id);
        // Write then rename, so a reader never sees half a message.
        let write = async {
            tokio::fs::write(&partial, body).await?;
            tokio::fs::rename(&partial, &path).await
        };
        write.await.map_err(|e| SendError::Transient {
            reason: format!("writing {}: {e}", path.display()),
            retry_after: None,
        })
    }
}

#[async_trait::async_trait]
impl Transport for FileTransport {
    /// One file per email; a failure stops there (the files already written
    /// are rewritten, not doubled, when the batch is retried).
    async fn send_batch(&self, _batch_key: Uuid, emails: &[(Uuid, Email)]) -> BatchAnswers {
        for (event_id, email) in emails {
            self.write(email, *event_id).await?;
        }
        Ok(vec![
            MemberAnswer::Accepted { provider_id: None };
            emails.len()
        ])
    }
}
