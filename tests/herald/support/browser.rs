//! Headless Chromium for the web page tests, driven over WebDriver
//! (`fantoccini`) through Debian's `chromedriver`, which `scripts/test`
//! installs. Nothing is downloaded: the browser is `/usr/bin/chromium`.
//!
//! chromedriver runs in a process group of its own, with a fresh profile
//! directory; dropping the [`Browser`] ends that group (the driver and the
//! browsers it started), and nothing else.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

use super::{eventually, free_port};

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver (scripts/test installs chromium-driver)");
        let profile = tempfile::Builder::new()
            .prefix("herald-chromium")
            .tempdir()
            .expect("profile dir");
        let mut capabilities = serde_json::Map::new();
        // Navigation returns once the DOM is ready: a page with a live
        // EventSource never stops "loading" for some definitions of loaded.
        capabilities.insert("pageLoadStrategy".into(), json!("eager"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    // No crash handler: it would detach from the driver's
                    // process group and outlive the test.
                    "--disable-crash-reporter", "--disable-breakpad",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        // Ready when it answers /status; then one session, once (a retried
        // session request could start a browser per attempt).
        eventually("chromedriver to listen", Duration::from_secs(30), || {
            let status = format!("{url}/status");
            async move {
                reqwest::get(status)
                    .await
                    .ok()?
                    .status()
                    .is_success()
                    .then_some(())
            }
        })
        .await;
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("a headless Chromium session");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Ends the session (the browser exits), then the driver.
    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = client.close().await;
        let _ = self.driver.kill();
    }

    /// A PNG of the viewport, saved as `target/test-artifacts/<name>`.
    pub async fn save_screenshot(&self, name: &str) -> Vec<u8> {
        let png = tokio::time::timeout(Duration::from_secs(30), self.client.screenshot())
            .await
            .expect("screenshot in time")
            .expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifact dir");
        std::fs::write(dir.join(name), &png).expect("save screenshot");
        png
    }

    /// Runs `script` (a function body; `arguments` available) in the page.
    pub async fn js(&self, script: &str) -> Value {
        let value = tokio::time::timeout(
            Duration::from_secs(10),
            self.client.execute(script, Vec::new()),
        )
        .await;
        value.expect("script in time").expect("execute script")
    }

    /// Polls `script` until it returns something truthy other than `false`
    /// or `null`; returns that value.
    /// [`Browser::start`], then the page at `base` (`{base}/`).
    pub async fn open_page(base: &str, width: u32, height: u32) -> Browser {
        let browser = Browser::start(width, height).await;
        browser
            .client
            .goto(&format!("{base}/"))
            .await
            .expect("open page");
        browser
    }

    pub async fn wait_for(&self, what: &str, within: Duration, script: &str) -> Value {
        eventually(what, within, || async move {
            let value = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.execute(script, Vec::new()),
            )
            .await;
            let value = value.ok()?.ok()?;
            match value {
                Value::Null | Value::Bool(false) => None,
                v => Some(v),
            }
        })
        .await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver's process group (the driver and the browsers it
        // started), by the group id the driver got at spawn. Through libc, not
        // `kill -KILL -<pgid>`: procps' kill read that as `kill(-1, …)` — every
        // process on the machine.
        let group = i32::try_from(self.driver.id()).unwrap_or(0);
        if group > 1 {
            // SAFETY: sends a signal to our own child's process group.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
