//! A real SMTP server: `tests/smtp/server.py` on Debian's aiosmtpd, started
//! on a free port; every message it receives is a JSON line on its stdout.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde_json::Value;

use super::Lines;

/// The running server; killed when dropped.
pub struct SmtpServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
}

impl SmtpServer {
    /// Starts the server with `args` (`--starttls CERT KEY`, `--tls CERT KEY`,
    /// `--auth USER:PASSWORD`).
    pub fn start(args: &[&str]) -> SmtpServer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/server.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3 runs tests/smtp/server.py (scripts/test-services.sh installs python3-aiosmtpd)");
        let stdout = super::read_lines(child.stdout.take().unwrap());
        let stderr = super::read_lines(child.stderr.take().unwrap());
        let line = stdout
            .wait_within_or_exit(&stderr, |l| l.starts_with("port "))
            .to_owned();
        let port = line["port ".len()..].trim().parse().unwrap();
        SmtpServer {
            child,
            port,
            stdout,
            stderr,
        }
    }

    /// Waits for `n` messages whose subject contains `subject` and returns them.
    pub fn wait_for(&self, subject: &str, n: usize) -> Vec<Value> {
        self.stdout
            .wait_for_count(&format!("mail `{subject}`"), n, |l| {
                message(l).is_some_and(|m| m["subject"].as_str().unwrap_or("").contains(subject))
            })
            .iter()
            .filter_map(|l| message(l))
            .collect()
    }

    /// Waits up to `limit` for `n` messages whose subject contains
    /// `subject`; true when they came.
    pub fn wait_within(&self, subject: &str, n: usize, limit: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        let mut lines = self.stdout.lines.lock().unwrap();
        loop {
            let found = lines
                .iter()
                .filter_map(|l| message(l))
                .filter(|m| m["subject"].as_str().unwrap_or("").contains(subject))
                .count();
            let now = std::time::Instant::now();
            if found >= n {
                return true;
            }
            if now >= end {
                return false;
            }
            lines = self
                .stdout
                .changed
                .wait_timeout(lines, end - now)
                .unwrap()
                .0;
        }
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| message(l))
            .collect()
    }

    /// What the server wrote on stderr (tracebacks).
    pub fn errors(&self) -> Vec<String> {
        self.stderr.all()
    }
}

/// A message line as JSON, its body with `\n` line ends (SMTP's are `\r\n`).
fn message(line: &str) -> Option<Value> {
    let mut message = serde_json::from_str::<Value>(line)
        .ok()
        .filter(|v| v.get("subject").is_some())?;
    if let Some(body) = message["body"].as_str() {
        message["body"] = Value::String(body.replace("\r\n", "\n"));
    }
    Some(message)
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
