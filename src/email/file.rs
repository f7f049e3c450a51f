//! The `file` transport (the dev default): one `.eml` file per email under
//! `<state_dir>/mail/`, named after the event id, so a repeated send of the
//! same event rewrites the same file instead of adding a second one.

use std::path::PathBuf;

use uuid::Uuid;

use super::{Email, SendError, Transport};

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

#[async_trait::async_trait]
impl Transport for FileTransport {
    async fn send(&self, email: &Email, idempotency_key: Uuid) -> Result<(), SendError> {
        let path = self.dir.join(format!("{idempotency_key}.eml"));
        let partial = self.dir.join(format!(".{idempotency_key}.eml.partial"));
        let body = render(email, idempotency_key);
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
