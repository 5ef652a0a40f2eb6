//! The `dockerflow-sidecar` command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;

use dockerflow_sidecar::config::{masked_toml, Config, Overrides};
use dockerflow_sidecar::mozlog::{Logger, MozlogLayer, Sink};

/// A sidecar proxy that answers the Dockerflow routes, logs one mozlog line
/// per request and forwards everything else to the app.
#[derive(Parser)]
#[command(name = "dockerflow-sidecar", version, about)]
struct Cli {
    /// The TOML configuration file (default: $DOCKERFLOW_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// The app to forward to: http://host:port or unix:/path/to.sock
    /// (overrides upstream.url).
    #[arg(long, global = true, value_name = "URL")]
    upstream: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Serve,
    /// Print the effective configuration (secrets masked) and exit 0, or
    /// explain what is wrong and exit 2.
    CheckConfig,
}

/// Exit status for a configuration error.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        config_file: cli.config,
        upstream: cli.upstream,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", masked_toml(&config));
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config),
    }
}

fn serve(config: Config) -> ExitCode {
    let sink = match Sink::new(Box::new(std::io::stdout())) {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("dockerflow-sidecar: cannot start the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logger = Arc::new(Logger::new(
        config.logging.logger.clone(),
        config.logging.format,
        sink,
    ));
    let subscriber =
        tracing_subscriber::registry().with(MozlogLayer::new(logger.clone(), config.logging.level));
    let _ = tracing::subscriber::set_global_default(subscriber);

    // One worker needs no work stealing: the current-thread scheduler does
    // the same job with less bookkeeping per task wake-up.
    let mut runtime = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.server.worker_threads > 1 {
            builder.worker_threads(config.server.worker_threads);
        }
        builder
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            logger.flush();
            return ExitCode::FAILURE;
        }
    };

    let signal_logger = logger.clone();
    let run_logger = logger.clone();
    let result = runtime.block_on(async move {
        // Installed before the listener exists, so a signal that arrives as
        // soon as `listening` is logged is already ours, not the default
        // (which would kill the process without a drain).
        let mut signals = Signals::install()?;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let name = signals.next().await;
            tracing::info!(signal = name, "shutdown requested");
            let _ = first_tx.send(());
            let name = signals.next().await;
            tracing::warn!(signal = name, "second signal: exiting now");
            signal_logger.flush();
            std::process::exit(1);
        });
        dockerflow_sidecar::run(config, run_logger, async {
            let _ = first_rx.await;
        })
        .await
    });
    let code = match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serve");
            ExitCode::FAILURE
        }
    };
    // Tunnels still open after the grace period are cut here.
    runtime.shutdown_timeout(Duration::from_millis(100));
    logger.flush();
    code
}

/// SIGTERM and SIGINT, subscribed once so no signal between two waits is lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and names it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
