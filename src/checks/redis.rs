//! `redis`: connect and PING; the answer must be PONG.

use super::{error_chain, shown, Check, CheckFuture, Level, Outcome};
use crate::config::CheckConfig;

/// PINGs Redis.
pub struct RedisCheck {
    client: redis::Client,
    target: String,
    level: Level,
}

impl RedisCheck {
    /// The check for the entry's `url`.
    pub fn new(check: &CheckConfig, level: Level) -> Result<RedisCheck, String> {
        let url = check.url.clone().unwrap_or_default();
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("`{}` is not a Redis URL: {e}", shown(&url)))?;
        Ok(RedisCheck {
            client,
            target: shown(&url),
            level,
        })
    }

    async fn check(&self) -> Outcome {
        let mut connection = match self.client.get_multiplexed_async_connection().await {
            Ok(connection) => connection,
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E001",
                    self.level,
                    format!("could not connect to {}: {}", self.target, error_chain(&e)),
                )
            }
        };
        match redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
        {
            Ok(reply) if reply == "PONG" => Outcome::default(),
            Ok(reply) => Outcome::fail(
                "sidecar.E002",
                self.level,
                format!("{} answered {reply:?} to PING", self.target),
            ),
            Err(e) => Outcome::fail(
                "sidecar.E004",
                self.level,
                format!("PING failed on {}: {}", self.target, error_chain(&e)),
            ),
        }
    }
}

impl Check for RedisCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(self.check())
    }
}
