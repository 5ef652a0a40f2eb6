//! mozlog: the JSON line format of Mozilla services, the writer of stdout,
//! the `request.summary` line and the tracing layer for the sidecar's own
//! messages.
//!
//! A line is `{"Timestamp","Type","Logger","Hostname","EnvVersion","Severity","Pid","Fields"}`
//! in that order (python-dockerflow's `JsonLogFormatter`). In `text` format
//! the same information is one human-readable line.

mod layer;
mod sink;
mod summary;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::LogFormat;

pub use layer::MozlogLayer;
pub use sink::Sink;
pub use summary::RequestSummary;

thread_local! {
    /// Each thread formats its lines here, so a line costs no allocation.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// The mozlog envelope version.
const ENV_VERSION: &str = "2.0";

/// Syslog severities used by mozlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Severity {
    /// 3.
    Error = 3,
    /// 4.
    Warning = 4,
    /// 6.
    Info = 6,
    /// 7.
    Debug = 7,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Warning => "WARN",
            Severity::Info => "INFO",
            Severity::Debug => "DEBUG",
        }
    }
}

/// Writes mozlog lines: the per-process constants and the sink.
pub struct Logger {
    /// The `Logger` field.
    name: String,
    /// The `Hostname` field.
    hostname: String,
    /// The `Pid` field.
    pid: u32,
    /// JSON or text.
    format: LogFormat,
    /// Where finished lines go.
    sink: Sink,
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct Envelope<'a, F: Serialize> {
    Timestamp: u64,
    Type: &'a str,
    Logger: &'a str,
    Hostname: &'a str,
    EnvVersion: &'a str,
    Severity: u8,
    Pid: u32,
    Fields: F,
}

impl Logger {
    /// A logger writing to `sink`.
    pub fn new(name: String, format: LogFormat, sink: Sink) -> Logger {
        Logger {
            name,
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            format,
            sink,
        }
    }

    /// Writes one line of type `kind` with `fields` (a struct or map that
    /// serializes to a JSON object). `text` renders the same for text format.
    pub fn emit<F: Serialize>(
        &self,
        kind: &str,
        severity: Severity,
        fields: &F,
        text: impl FnOnce(&mut String),
    ) {
        let now = SystemTime::now();
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                buf.clear();
                self.render(&mut buf, kind, severity, fields, text, now);
                self.sink.write(&buf);
            }
            // Re-entered while formatting (never expected): use a fresh buffer.
            Err(_) => {
                let mut buf = Vec::new();
                self.render(&mut buf, kind, severity, fields, text, now);
                self.sink.write(&buf);
            }
        });
    }

    fn render<F: Serialize>(
        &self,
        buf: &mut Vec<u8>,
        kind: &str,
        severity: Severity,
        fields: &F,
        text: impl FnOnce(&mut String),
        now: SystemTime,
    ) {
        match self.format {
            LogFormat::Mozlog => {
                let envelope = Envelope {
                    Timestamp: now
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                    Type: kind,
                    Logger: &self.name,
                    Hostname: &self.hostname,
                    EnvVersion: ENV_VERSION,
                    Severity: severity as u8,
                    Pid: self.pid,
                    Fields: fields,
                };
                if serde_json::to_writer(&mut *buf, &envelope).is_err() {
                    buf.clear();
                    return;
                }
                buf.push(b'\n');
            }
            LogFormat::Text => {
                let mut s = format!(
                    "{} {:<5} {kind}",
                    humantime::format_rfc3339_millis(now),
                    severity.label()
                );
                text(&mut s);
                s.push('\n');
                buf.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// Lines dropped (stdout stalled, buffer full) since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.sink.take_dropped()
    }

    /// Waits until every line written so far is on stdout.
    pub fn flush(&self) {
        self.sink.flush(Duration::from_secs(5));
    }
}
