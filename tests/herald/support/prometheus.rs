//! A real Prometheus (Debian's package) scraping a Herald's admin listener
//! every second, with deploy/prometheus/herald.rules.yml loaded as an
//! operator would load it, and its HTTP query API for the tests.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{eventually, free_port};

/// A running Prometheus, stopped (by its PID) on drop.
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus on a free port of 127.0.0.1, scraping `target`
    /// (`host:port`, Herald's admin listener) as the job `herald`.
    pub async fn scraping(target: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("herald-prometheus")
            .tempdir()
            .expect("tempdir");
        let rules =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/herald.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: ['{target}']\n",
            rules = rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (scripts/test installs Debian's prometheus)");
        let prometheus = Prometheus {
            child,
            dir,
            port,
            http: reqwest::Client::new(),
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let http = prometheus.http.clone();
        eventually("prometheus to be ready", Duration::from_secs(30), || {
            let (http, ready) = (http.clone(), ready.clone());
            async move {
                let r = http.get(ready).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        prometheus
    }

    /// Prometheus' own log, for a failure's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `query`, its `data` (panics unless `success`).
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let body: Value = self
            .http
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(query)
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("prometheus answers JSON");
        assert_eq!(
            body["status"], "success",
            "prometheus refused {path} {query:?}: {body}"
        );
        body["data"].clone()
    }

    /// The series an instant query returns now.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
