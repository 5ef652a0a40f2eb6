//! Heartbeat checks: levels and messages in python-dockerflow's terms, the
//! `Check` trait, one file per kind, and the concurrent runner.
//!
//! Message ids are stable and documented in README.md:
//! `sidecar.E001` could not connect, `sidecar.E002` unexpected answer,
//! `sidecar.E003` timed out, `sidecar.E004` query or command failed,
//! `sidecar.E005` not enough free disk space, `sidecar.E006` file missing,
//! `sidecar.E007` file too old, `sidecar.E008` no Dockerflow heartbeat body
//! to merge, `sidecar.W001` migrations pending.

mod disk;
mod file;
mod http;
mod postgres;
mod redis;
mod tcp;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::{CheckConfig, CheckKind, CheckLevel, Config};
pub(crate) use crate::error_chain;

/// A check level (python-dockerflow / Django checks): higher is worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

    /// The level a name stands for (`ok`, `warning`, …), as in bodies.
    pub fn from_name(name: &str) -> Option<Level> {
        Some(match name {
            "ok" => Level::OK,
            "debug" => Level::DEBUG,
            "info" => Level::INFO,
            "warning" => Level::WARNING,
            "error" => Level::ERROR,
            "critical" => Level::CRITICAL,
            _ => return None,
        })
    }
}

impl From<CheckLevel> for Level {
    fn from(level: CheckLevel) -> Level {
        match level {
            CheckLevel::Warning => Level::WARNING,
            CheckLevel::Error => Level::ERROR,
            CheckLevel::Critical => Level::CRITICAL,
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

/// The outcome of one check, as shown in the heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The key in `checks`.
    pub name: String,
    /// What it found; empty means ok.
    pub messages: Vec<Message>,
    /// A level reported without messages (a merged check that only gave
    /// its status).
    pub bare_level: Level,
    /// How long the check took (a merged check: the check that brought it).
    pub duration: Duration,
}

impl CheckResult {
    /// The worst level among the messages.
    pub fn level(&self) -> Level {
        self.messages
            .iter()
            .map(|m| m.level)
            .max()
            .unwrap_or(Level::OK)
            .max(self.bare_level)
    }
}

/// What one run of a check found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The check's own findings; empty means ok.
    pub messages: Vec<Message>,
    /// Checks reported by the target itself (a merged Dockerflow heartbeat).
    pub merged: Vec<CheckResult>,
}

impl Outcome {
    /// A single failure.
    pub fn fail(id: &str, level: Level, text: String) -> Outcome {
        Outcome {
            messages: vec![Message {
                id: id.into(),
                level,
                text,
            }],
            merged: Vec::new(),
        }
    }
}

/// The outcome of all checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

    /// Each check's result, in configuration order (merged ones after
    /// the check that brought them).
    pub fn results(&self) -> &[CheckResult] {
        &self.results
    }
}

/// A boxed future, so checks can be stored as trait objects.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Something the heartbeat verifies.
pub trait Check: Send + Sync {
    /// Runs once.
    fn run(&self) -> CheckFuture<'_>;
}

/// One configured check with its name, level and time limit.
struct Entry {
    name: String,
    level: Level,
    timeout: Duration,
    check: Box<dyn Check>,
}

/// All configured checks.
pub struct Registry {
    entries: Vec<Entry>,
    silenced: HashSet<String>,
}

impl Registry {
    /// Builds every check of `config.heartbeat.checks`.
    pub fn from_config(config: &Config) -> Result<Registry, String> {
        let mut entries = Vec::new();
        for check in &config.heartbeat.checks {
            let level = Level::from(check.level);
            let timeout = check.timeout.unwrap_or(config.heartbeat.timeout);
            let built = build(check, level, timeout, config)
                .map_err(|e| format!("heartbeat check `{}`: {e}", check.name))?;
            entries.push(Entry {
                name: check.name.clone(),
                level,
                timeout,
                check: built,
            });
        }
        Ok(Registry {
            entries,
            silenced: config.heartbeat.silenced.iter().cloned().collect(),
        })
    }

    /// The longest time limit of any check: the route answers within it.
    pub fn longest_timeout(&self) -> Duration {
        self.entries
            .iter()
            .map(|e| e.timeout)
            .max()
            .unwrap_or_default()
    }

    /// Runs every check concurrently, each bounded by its time limit; one
    /// that outlives it reports `sidecar.E003` at its level.
    pub async fn run_all(&self) -> Report {
        let runs = self.entries.iter().map(|entry| async move {
            let started = std::time::Instant::now();
            let outcome = match tokio::time::timeout(entry.timeout, entry.check.run()).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    let text = format!(
                        "timed out after {}",
                        humantime::format_duration(entry.timeout)
                    );
                    Outcome::fail("sidecar.E003", entry.level, text)
                }
            };
            (entry, outcome, started.elapsed())
        });
        let outcomes = futures_util::future::join_all(runs).await;

        let mut names: HashSet<String> = self.entries.iter().map(|e| e.name.clone()).collect();
        let mut results = Vec::new();
        for (entry, outcome, duration) in outcomes {
            results.push(self.silence(CheckResult {
                name: entry.name.clone(),
                messages: outcome.messages,
                bare_level: Level::OK,
                duration,
            }));
            for mut merged in outcome.merged {
                merged.duration = duration;
                // Keep the target's own names unless one is already taken.
                if !names.insert(merged.name.clone()) {
                    merged.name = format!("{}.{}", entry.name, merged.name);
                    names.insert(merged.name.clone());
                }
                results.push(self.silence(merged));
            }
        }
        Report { results }
    }

    fn silence(&self, mut result: CheckResult) -> CheckResult {
        result.messages.retain(|m| !self.silenced.contains(&m.id));
        result
    }
}

/// The check for one configuration entry.
fn build(
    check: &CheckConfig,
    level: Level,
    timeout: Duration,
    config: &Config,
) -> Result<Box<dyn Check>, String> {
    Ok(match check.kind {
        CheckKind::Upstream => Box::new(http::HttpCheck::upstream(check, level, config)?),
        CheckKind::Http => Box::new(http::HttpCheck::url(check, level)?),
        CheckKind::Tcp => Box::new(tcp::TcpCheck::new(check, level)),
        CheckKind::Postgres => Box::new(postgres::PostgresCheck::new(check, level, timeout)?),
        CheckKind::Redis => Box::new(redis::RedisCheck::new(check, level)?),
        CheckKind::Disk => Box::new(disk::DiskCheck::new(check, level)),
        CheckKind::File => Box::new(file::FileCheck::new(check, level)),
    })
}

/// The URL of a check, with any password masked, for messages.
fn shown(url: &str) -> String {
    crate::config::mask_url_password(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_follow_python_dockerflow() {
        let levels = [
            Level::OK,
            Level::DEBUG,
            Level::INFO,
            Level::WARNING,
            Level::ERROR,
            Level::CRITICAL,
        ];
        let names: Vec<&str> = levels.iter().map(|l| l.name()).collect();
        assert_eq!(
            names,
            ["ok", "debug", "info", "warning", "error", "critical"]
        );
        for level in levels {
            assert_eq!(Level::from_name(level.name()), Some(level));
        }
    }
}
