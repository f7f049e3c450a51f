//! A real nginx (Debian's package) in front of a Herald, configured with
//! docs/DEPLOY.md's own `upstream` and `server` blocks: only the upstream
//! address and the listen port are filled in, so the proxy the tests go
//! through is the one the operator is told to run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port, repo_file};

/// A running nginx, stopped (by its PID) on drop.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

/// The nginx block of docs/DEPLOY.md, as written there.
pub fn deploy_block() -> String {
    let deploy = repo_file("docs/DEPLOY.md");
    deploy
        .split("```nginx\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/DEPLOY.md has an ```nginx block")
        .to_string()
}

fn nginx_binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nginx")
    }
}

impl Nginx {
    /// Starts nginx on a free port of 127.0.0.1, proxying to `upstream`
    /// (`host:port`, Herald's public listener).
    pub async fn start_in_front_of(upstream: &str) -> Nginx {
        let block = deploy_block();
        assert!(
            block.contains("server 127.0.0.1:8080;") && block.contains("listen 80;"),
            "DEPLOY.md's nginx block names its upstream and port as the test expects:\n{block}"
        );
        let port = free_port();
        let block = block
            .replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        let dir = tempfile::Builder::new()
            .prefix("herald-nginx")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().display();
        // Run as root (CI), nginx's workers would switch to `nobody`, who
        // cannot write the temp directory: keep them as the test's user.
        let user = if running_as_root() { "user root;" } else { "" };
        let conf = format!(
            "{user}\n\
             worker_processes 1;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             {block}\n\
             }}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (scripts/test installs Debian's nginx)");
        let nginx = Nginx {
            child,
            _dir: dir,
            port,
        };
        let address = format!("127.0.0.1:{port}");
        eventually(
            "nginx to accept connections",
            Duration::from_secs(10),
            || {
                let address = address.clone();
                async move {
                    tokio::net::TcpStream::connect(&address)
                        .await
                        .ok()
                        .map(|_| ())
                }
            },
        )
        .await;
        nginx
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Whether the tests run as root (nginx then needs `user root;`).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master (ours, by PID): it stops its workers.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
