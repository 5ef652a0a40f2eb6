//! `tcp`: a connection to host:port opens.

use tokio::net::TcpStream;

use super::{Check, CheckFuture, Level, Outcome};
use crate::config::CheckConfig;

/// Opens a TCP connection.
pub struct TcpCheck {
    /// `host:port`.
    address: String,
    level: Level,
}

impl TcpCheck {
    /// The check for `tcp://host:port`.
    pub fn new(check: &CheckConfig, level: Level) -> TcpCheck {
        let url = check.url.clone().unwrap_or_default();
        let address = url
            .trim_start_matches("tcp://")
            .trim_end_matches('/')
            .to_owned();
        TcpCheck { address, level }
    }
}

impl Check for TcpCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            match TcpStream::connect(&self.address).await {
                Ok(_) => Outcome::default(),
                Err(e) => Outcome::fail(
                    "sidecar.E001",
                    self.level,
                    format!("could not connect to {}: {e}", self.address),
                ),
            }
        })
    }
}
