//! A tracing layer that turns the sidecar's own `tracing` events into mozlog
//! lines: `Type` is the event's target, `Fields` its fields (the message
//! becomes `msg`).

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::{Logger, Severity};
use crate::config::LogLevel;

/// Our targets: the crate's modules, and the named line types it writes
/// (`heartbeat`). Other crates (hyper, h2) only log warnings and errors
/// unless the level is debug.
const OWN_TARGETS: [&str; 2] = ["dockerflow_sidecar", "heartbeat"];

/// The layer; install it on a `tracing_subscriber::registry()`.
pub struct MozlogLayer {
    logger: Arc<Logger>,
    max: Level,
}

impl MozlogLayer {
    /// A layer writing through `logger` at `level` and more severe.
    pub fn new(logger: Arc<Logger>, level: LogLevel) -> MozlogLayer {
        let max = match level {
            LogLevel::Error => Level::ERROR,
            LogLevel::Warn => Level::WARN,
            LogLevel::Info => Level::INFO,
            LogLevel::Debug => Level::DEBUG,
        };
        MozlogLayer { logger, max }
    }

    fn wants(&self, metadata: &Metadata<'_>) -> bool {
        let level = *metadata.level();
        level <= self.max
            && (OWN_TARGETS.iter().any(|t| metadata.target().starts_with(t))
                || level <= Level::WARN
                || self.max == Level::DEBUG)
    }
}

/// Collects an event's fields into a JSON object.
struct JsonVisitor(Map<String, Value>);

impl JsonVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        let name = if field.name() == "message" {
            "msg"
        } else {
            field.name()
        };
        self.0.insert(name.to_owned(), value);
    }
}

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

impl<S: Subscriber> Layer<S> for MozlogLayer {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        self.wants(metadata)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        if !self.wants(metadata) {
            return;
        }
        let severity = match *metadata.level() {
            Level::ERROR => Severity::Error,
            Level::WARN => Severity::Warning,
            Level::INFO => Severity::Info,
            _ => Severity::Debug,
        };
        let mut visitor = JsonVisitor(Map::new());
        event.record(&mut visitor);
        let kind = metadata.target().replace("::", ".");
        let fields = visitor.0;
        self.logger.emit(&kind, severity, &fields, |s| {
            if let Some(Value::String(msg)) = fields.get("msg") {
                let _ = write!(s, " {msg}");
            }
            for (k, v) in fields.iter().filter(|(k, _)| *k != "msg") {
                let _ = write!(s, " {k}={v}");
            }
        });
    }
}
