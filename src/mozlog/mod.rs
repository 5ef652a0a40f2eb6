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

/// Appends `s` as a JSON string, quoted and escaped byte for byte as
/// serde_json escapes it. The text of a line (a path, a user agent) rarely
/// needs an escape: it is checked eight bytes at a time and then copied
/// whole, where serde_json looks each byte up (that was about a third of
/// the cost of a summary line).
pub(crate) fn json_str(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    if any_needs_escape(bytes) {
        escape(buf, bytes);
    } else {
        buf.extend_from_slice(bytes);
    }
    buf.push(b'"');
}

/// Whether a byte of `bytes` needs an escape in a JSON string.
fn any_needs_escape(bytes: &[u8]) -> bool {
    let word = |w: &[u8]| {
        let mut word = [0; 8];
        word.copy_from_slice(w);
        needs_escape(u64::from_le_bytes(word))
    };
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    let mut words = bytes.chunks_exact(8);
    if words.any(word) {
        return true;
    }
    // The last bytes, in one word that overlaps the ones already checked.
    !words.remainder().is_empty() && word(&bytes[bytes.len() - 8..])
}

/// The escaping itself, byte by byte, as serde_json does it.
fn escape(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut clean = 0; // bytes[..clean] are in `buf`
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[clean..i]);
        if escape.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(escape);
        }
        clean = i + 1;
    }
    buf.extend_from_slice(&bytes[clean..]);
}

/// Whether any of the eight bytes of `word` is a control character, `"`
/// or `\\` (the classic "has a zero byte" and "has a byte less than n"
/// tests, which are exact).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    control
        | zero_byte(word ^ (ONES * u64::from(b'"')))
        | zero_byte(word ^ (ONES * u64::from(b'\\')))
        != 0
}

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
    /// The `Pid` field.
    pid: u32,
    /// JSON or text.
    format: LogFormat,
    /// Where finished lines go.
    sink: Sink,
    /// `,"Logger":…,"Hostname":…,"EnvVersion":"2.0"`, the same on every line.
    constants: Vec<u8>,
}

/// What serde would write for the envelope; render writes the same bytes by
/// hand (a test holds them equal), without escaping its constant keys and
/// values on every line: serde_json scans each key byte by byte.
#[cfg(test)]
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
        let hostname = gethostname::gethostname().to_string_lossy().into_owned();
        let mut constants = b",\"Logger\":".to_vec();
        json_str(&mut constants, &name);
        constants.extend_from_slice(b",\"Hostname\":");
        json_str(&mut constants, &hostname);
        constants.extend_from_slice(b",\"EnvVersion\":");
        json_str(&mut constants, ENV_VERSION);
        Logger {
            pid: std::process::id(),
            format,
            sink,
            constants,
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
        self.emit_json(
            kind,
            severity,
            |buf| {
                // Fields that cannot be JSON (never expected): an empty object.
                let start = buf.len();
                if serde_json::to_writer(&mut *buf, fields).is_err() {
                    buf.truncate(start);
                    buf.extend_from_slice(b"{}");
                }
            },
            text,
        );
    }

    /// [`Logger::emit`] with the fields written by `fields`: a JSON object
    /// appended to the buffer (the request.summary line writes its own).
    pub(crate) fn emit_json(
        &self,
        kind: &str,
        severity: Severity,
        fields: impl FnOnce(&mut Vec<u8>),
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

    fn render(
        &self,
        buf: &mut Vec<u8>,
        kind: &str,
        severity: Severity,
        fields: impl FnOnce(&mut Vec<u8>),
        text: impl FnOnce(&mut String),
        now: SystemTime,
    ) {
        match self.format {
            LogFormat::Mozlog => {
                let mut number = itoa::Buffer::new();
                let timestamp = now
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                buf.extend_from_slice(b"{\"Timestamp\":");
                buf.extend_from_slice(number.format(timestamp).as_bytes());
                buf.extend_from_slice(b",\"Type\":");
                json_str(buf, kind);
                buf.extend_from_slice(&self.constants);
                buf.extend_from_slice(b",\"Severity\":");
                buf.extend_from_slice(number.format(severity as u8).as_bytes());
                buf.extend_from_slice(b",\"Pid\":");
                buf.extend_from_slice(number.format(self.pid).as_bytes());
                buf.extend_from_slice(b",\"Fields\":");
                fields(buf);
                buf.extend_from_slice(b"}\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character that needs an escape, at every position of an
    /// eight-byte word and past it, is escaped as serde_json escapes it.
    #[test]
    fn json_str_escapes_as_serde_json_does() {
        let mut specials: Vec<char> = (0u8..0x20).map(char::from).collect();
        specials.extend(['"', '\\', '\u{7f}', 'é', '\u{2028}', '😀', 'a', '/']);
        for c in specials {
            for at in 0..40 {
                for len in [at + 1, at + 3, at + 8, 20, 40] {
                    let mut s: String = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"
                        .chars()
                        .take(len.max(at + 1))
                        .collect();
                    s.replace_range(at..at + 1, c.encode_utf8(&mut [0; 4]));
                    let mut ours = Vec::new();
                    json_str(&mut ours, &s);
                    assert_eq!(
                        String::from_utf8(ours).unwrap(),
                        serde_json::to_string(&s).unwrap(),
                        "{s:?}"
                    );
                }
            }
        }
        let mut ours = Vec::new();
        json_str(&mut ours, "");
        assert_eq!(ours, b"\"\"");
    }

    /// The hand-written envelope is byte for byte what serde_json writes
    /// for the same line, escapes included.
    #[test]
    fn the_envelope_is_what_serde_would_write() {
        let name = "side\"car\u{1}é".to_string();
        let sink = Sink::new(Box::new(std::io::sink())).unwrap();
        let logger = Logger::new(name.clone(), LogFormat::Mozlog, sink);
        let fields = serde_json::json!({"a": "b\n", "n": 1});
        let now = UNIX_EPOCH + Duration::from_nanos(1_795_302_360_024_662_880);
        let mut buf = Vec::new();
        logger.render(
            &mut buf,
            "request.summary",
            Severity::Warning,
            |b| json_str_value(b, &fields),
            |_| {},
            now,
        );
        let mut expected = serde_json::to_vec(&Envelope {
            Timestamp: 1_795_302_360_024_662_880,
            Type: "request.summary",
            Logger: &name,
            Hostname: &gethostname::gethostname().to_string_lossy(),
            EnvVersion: ENV_VERSION,
            Severity: 4,
            Pid: std::process::id(),
            Fields: &fields,
        })
        .unwrap();
        expected.push(b'\n');
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    fn json_str_value(buf: &mut Vec<u8>, value: &serde_json::Value) {
        serde_json::to_writer(buf, value).unwrap();
    }
}
