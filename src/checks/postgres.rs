//! `postgres`: connect and run a query. TLS follows the URL's `sslmode` as
//! libpq does (prefer by default: encrypted when the server offers it, the
//! certificate not verified); with `ca_file` the certificate is verified
//! against it, host name included (libpq's verify-full).
//! Then an optional second query whose rows mean
//! "migrations pending" gives a warning (python-dockerflow's W001).

use tokio_postgres_rustls::MakeRustlsConnect;

use super::{error_chain, shown, Check, CheckFuture, Level, Message, Outcome};
use crate::config::CheckConfig;

/// Connects and queries PostgreSQL.
pub struct PostgresCheck {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    query: String,
    migrations_query: Option<String>,
    /// The URL with its password masked, for messages.
    target: String,
    level: Level,
}

impl PostgresCheck {
    /// The check for the entry's `url`.
    pub fn new(
        check: &CheckConfig,
        level: Level,
        timeout: std::time::Duration,
    ) -> Result<PostgresCheck, String> {
        let url = check.url.clone().unwrap_or_default();
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("`{}` is not a PostgreSQL URL: {e}", shown(&url)))?;
        if check.ca_file.is_some() {
            // Verification means nothing if a man in the middle can answer
            // "no TLS here" and get plaintext: with a CA file, TLS is required.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        // The server gives up on a query the check has given up on, instead
        // of keeping a backend busy after the connection is gone.
        config.options(format!(
            "-c statement_timeout={}",
            timeout.as_millis().max(1)
        ));
        // libpq's semantics: sslmode prefer/require encrypt without
        // verifying; a configured CA file asks for verification (verify-full).
        let tls = match &check.ca_file {
            Some(ca_file) => crate::tls::client_config(Some(ca_file))?,
            None => crate::tls::encrypt_only_config()?,
        };
        let tls = MakeRustlsConnect::new(tls);
        Ok(PostgresCheck {
            config,
            tls,
            query: check.query.clone().unwrap_or_else(|| "SELECT 1".into()),
            migrations_query: check.migrations_query.clone(),
            target: shown(&url),
            level,
        })
    }

    async fn check(&self) -> Outcome {
        let (client, connection) = match self.config.connect(self.tls.clone()).await {
            Ok(pair) => pair,
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E001",
                    self.level,
                    format!("could not connect to {}: {}", self.target, describe(&e)),
                )
            }
        };
        // The connection does the I/O. It ends when `client` is dropped on
        // the normal path; when the check times out, this guard aborts it so
        // no socket (and no server backend) outlives the check.
        let _connection = AbortOnDrop(tokio::spawn(connection));
        if let Err(e) = client.simple_query(&self.query).await {
            return Outcome::fail(
                "sidecar.E004",
                self.level,
                format!("query failed on {}: {}", self.target, describe(&e)),
            );
        }
        let Some(migrations) = &self.migrations_query else {
            return Outcome::default();
        };
        match client.query(migrations.as_str(), &[]).await {
            Ok(rows) if rows.is_empty() => Outcome::default(),
            Ok(rows) => Outcome {
                messages: vec![Message {
                    id: "sidecar.W001".into(),
                    level: Level::WARNING,
                    text: format!("{} unapplied migrations found", rows.len()),
                }],
                merged: Vec::new(),
            },
            Err(e) => Outcome::fail(
                "sidecar.E004",
                self.level,
                format!(
                    "migrations query failed on {}: {}",
                    self.target,
                    describe(&e)
                ),
            ),
        }
    }
}

/// The server's own words when it sent an error, else the error chain.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error_chain(e),
    }
}

impl Check for PostgresCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(self.check())
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
