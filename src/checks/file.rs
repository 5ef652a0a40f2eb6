//! `file`: a path exists and, optionally, was modified within `max_age`
//! (jobs that touch a file when they run).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{Check, CheckFuture, Level, Outcome};
use crate::config::CheckConfig;

/// Looks at a file's metadata.
pub struct FileCheck {
    path: PathBuf,
    max_age: Option<Duration>,
    level: Level,
}

impl FileCheck {
    /// The check for the entry's `path` and `max_age`.
    pub fn new(check: &CheckConfig, level: Level) -> FileCheck {
        FileCheck {
            path: PathBuf::from(check.path.clone().unwrap_or_default()),
            max_age: check.max_age,
            level,
        }
    }

    async fn check(&self) -> Outcome {
        let metadata = match tokio::fs::metadata(&self.path).await {
            Ok(metadata) => metadata,
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E006",
                    self.level,
                    format!("{}: {e}", self.path.display()),
                )
            }
        };
        let Some(max_age) = self.max_age else {
            return Outcome::default();
        };
        let age = metadata
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        if age <= max_age {
            return Outcome::default();
        }
        let age = Duration::from_secs(age.as_secs());
        Outcome::fail(
            "sidecar.E007",
            self.level,
            format!(
                "{} was last modified {} ago, more than {}",
                self.path.display(),
                humantime::format_duration(age),
                humantime::format_duration(max_age)
            ),
        )
    }
}

impl Check for FileCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(self.check())
    }
}
