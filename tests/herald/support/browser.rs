//! Headless Chromium for the web page tests, driven over WebDriver
//! (`fantoccini`) through Debian's `chromedriver`, which `scripts/test`
//! installs. Nothing is downloaded: the browser is `/usr/bin/chromium`.
//!
//! chromedriver runs in a process group of its own, with a fresh profile
//! directory; dropping the [`Browser`] ends that group (the driver and the
//! browsers it started), and nothing else.
//!
//! A driver that fails says why. chromedriver picks its own port (`--port=0`)
//! and prints it: a port chosen here and released before the driver binds it
//! could be taken meanwhile by the thousands of connections other tests open
//! (chromedriver then exits 1, "IPv6 port not available"). Its stdout and
//! stderr go to `driver.log` in the profile directory; a driver that exits
//! before it listens, or never says where, fails the test with its status and
//! that log, and a test that fails later prints the log as it ends.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

use super::eventually;

pub struct Browser {
    pub client: Client,
    driver: Driver,
    _profile: tempfile::TempDir,
}

/// A running chromedriver: its process, the port it reported, its output.
pub struct Driver {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

/// How long a driver has to say where it listens.
const DRIVER_START: Duration = Duration::from_secs(30);

impl Driver {
    /// Starts `chromedriver --port=<port>` (0: its own choice) with its output
    /// in `dir/driver.log`, and waits until it says where it listens. The
    /// error names the cause: it did not start, it exited (status and
    /// output), or it said nothing in time (its output so far).
    pub async fn start(port: u16, dir: &Path) -> Result<Driver, String> {
        let log = dir.join("driver.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| {
                format!("chromedriver did not start: {e} (scripts/test installs chromium-driver)")
            })?;
        let mut driver = Driver {
            child,
            port: 0,
            log,
        };
        let deadline = Instant::now() + DRIVER_START;
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let output = driver.output();
            if let Some(port) = output
                .lines()
                .find_map(|line| line.split("started successfully on port ").nth(1))
                .and_then(|rest| rest.trim_end_matches('.').trim().parse().ok())
            {
                driver.port = port;
                return Ok(driver);
            }
            if let Ok(Some(status)) = driver.child.try_wait() {
                return Err(format!(
                    "chromedriver exited ({status}) before it listened; its output:\n{}",
                    driver.output()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "chromedriver did not say where it listens within {DRIVER_START:?}; its output:\n{output}"
                ));
            }
        }
    }

    /// What the driver has written so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("({}: {e})", self.log.display()))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The driver's process group (the driver and the browsers it
        // started), by the group id the driver got at spawn. Through libc, not
        // `kill -KILL -<pgid>`: procps' kill read that as `kill(-1, …)` — every
        // process on the machine.
        let group = i32::try_from(self.child.id()).unwrap_or(0);
        if group > 1 {
            // SAFETY: sends a signal to our own child's process group.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("herald-chromium")
            .tempdir()
            .expect("profile dir");
        let driver = match Driver::start(0, profile.path()).await {
            Ok(driver) => driver,
            Err(why) => panic!("{why}"),
        };
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
        let url = format!("http://127.0.0.1:{}", driver.port);
        // It listens once it has said its port; then one session, once (a
        // retried session request could start a browser per attempt).
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = match ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&url)
            .await
        {
            Ok(client) => client,
            Err(e) => panic!(
                "no headless Chromium session: {e}; chromedriver's output:\n{}",
                driver.output()
            ),
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Ends the session (the browser exits), then the driver.
    pub async fn close(self) {
        let client = self.client.clone();
        let _ = client.close().await;
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

    /// Clicks the element with this id, as a user would (it must be shown).
    pub async fn click(&self, id: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click #{id}: {e}"));
    }

    /// Types `text` into the element with this id, key by key.
    pub async fn type_into(&self, id: &str, text: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into #{id}: {e}"));
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
        // A test that failed with a browser open shows what the driver said.
        if std::thread::panicking() {
            eprintln!("chromedriver's output:\n{}", self.driver.output());
        }
    }
}
