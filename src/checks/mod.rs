//! Heartbeat checks: the `Check` trait, levels and messages in
//! python-dockerflow's terms, and the concurrent runner.
//!
//! Message ids are stable and documented in README.md:
//! `sidecar.E001` could not connect, `sidecar.E002` unexpected status,
//! `sidecar.E003` timed out.

mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use upstream::UpstreamCheck;

/// A check level (python-dockerflow / Django checks): higher is worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Level(pub u8);

impl Level {
    /// Passed.
    pub const OK: Level = Level(0);
    /// Debug.
    pub const DEBUG: Level = Level(10);
    /// Info.
    pub const INFO: Level = Level(20);
    /// Warning: reported, the heartbeat still answers 200.
    pub const WARNING: Level = Level(30);
    /// Error: the heartbeat answers the failed status.
    pub const ERROR: Level = Level(40);
    /// Critical.
    pub const CRITICAL: Level = Level(50);

    /// The name used in heartbeat bodies.
    pub fn name(self) -> &'static str {
        match self.0 {
            0..=9 => "ok",
            10..=19 => "debug",
            20..=29 => "info",
            30..=39 => "warning",
            40..=49 => "error",
            _ => "critical",
        }
    }
}

/// One finding of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stable id, such as `sidecar.E001`.
    pub id: String,
    /// How bad it is.
    pub level: Level,
    /// What happened.
    pub text: String,
}

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// The check's name (the key in `checks`).
    pub name: String,
    /// What it found; empty means ok.
    pub messages: Vec<Message>,
}

impl CheckResult {
    /// The worst level among the messages.
    pub fn level(&self) -> Level {
        self.messages
            .iter()
            .map(|m| m.level)
            .max()
            .unwrap_or(Level::OK)
    }
}

/// The outcome of all checks.
#[derive(Debug, Clone, Default)]
pub struct Report {
    results: Vec<CheckResult>,
}

impl Report {
    /// The worst level of any check.
    pub fn level(&self) -> Level {
        self.results
            .iter()
            .map(CheckResult::level)
            .max()
            .unwrap_or(Level::OK)
    }

    /// Each check's result, in configuration order.
    pub fn results(&self) -> &[CheckResult] {
        &self.results
    }
}

/// A boxed future, so checks can be stored as trait objects.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Vec<Message>> + Send + 'a>>;

/// Something the heartbeat verifies.
pub trait Check: Send + Sync {
    /// The key in the heartbeat's `checks`.
    fn name(&self) -> &str;
    /// The level a failure is reported at.
    fn level(&self) -> Level;
    /// Runs once; an empty list means ok.
    fn run(&self) -> CheckFuture<'_>;
}

/// All configured checks.
pub struct Registry {
    checks: Vec<Box<dyn Check>>,
    timeout: Duration,
}

impl Registry {
    /// A registry running `checks`, each bounded by `timeout`.
    pub fn new(checks: Vec<Box<dyn Check>>, timeout: Duration) -> Registry {
        Registry { checks, timeout }
    }

    /// Runs every check concurrently; one that outlives the timeout reports
    /// `sidecar.E003` at its level.
    pub async fn run_all(&self) -> Report {
        let runs = self.checks.iter().map(|check| async move {
            let messages = match tokio::time::timeout(self.timeout, check.run()).await {
                Ok(messages) => messages,
                Err(_) => vec![Message {
                    id: "sidecar.E003".into(),
                    level: check.level(),
                    text: format!(
                        "timed out after {}",
                        humantime::format_duration(self.timeout)
                    ),
                }],
            };
            CheckResult {
                name: check.name().to_owned(),
                messages,
            }
        });
        Report {
            results: futures_util::future::join_all(runs).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_follow_python_dockerflow() {
        let names: Vec<&str> = [
            Level::OK,
            Level::DEBUG,
            Level::INFO,
            Level::WARNING,
            Level::ERROR,
            Level::CRITICAL,
        ]
        .iter()
        .map(|l| l.name())
        .collect();
        assert_eq!(
            names,
            ["ok", "debug", "info", "warning", "error", "critical"]
        );
    }
}
