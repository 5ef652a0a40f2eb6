//! The `dockerflow-sidecar` command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;

use dockerflow_sidecar::config::{masked_toml, Config, Overrides};
use dockerflow_sidecar::mozlog::{Logger, MozlogLayer, Sink};

mod allocator;
mod trim;

#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

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
    /// Read and prune the stored browser security reports.
    Reports {
        #[command(subcommand)]
        command: ReportsCommand,
    },
    /// List, replay, monitor and prune hook deliveries (the outbox).
    Hooks {
        #[command(subcommand)]
        command: HooksCommand,
    },
    /// Ask the running sidecar to start draining (POST /drain on its admin
    /// listener, with the configured token): a Kubernetes preStop hook.
    /// SIGTERM, when it follows, waits only what is left of the drain.
    Drain,
}

#[derive(Subcommand)]
enum HooksCommand {
    /// List deliveries, newest first.
    List {
        /// waiting, sending, sent or error.
        #[arg(long)]
        status: Option<String>,
        /// Only this hook's.
        #[arg(long)]
        hook: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Deliver now: the given ids, or every waiting and error row (of one
    /// hook); error rows are replayed.
    Send {
        /// Only this hook's rows.
        #[arg(long)]
        hook: Option<String>,
        /// These rows (webhook ids).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
    },
    /// Count rows in a status; exit 1 when more than --limit (for cron or CI).
    Monitor {
        /// error or waiting.
        #[arg(long)]
        status: String,
        /// The most rows that are fine.
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Only rows created at least this many minutes ago (a waiting row
        /// that old is stuck).
        #[arg(long, default_value_t = 0)]
        minutes_ago: u64,
    },
    /// Delete rows created longer ago than this (sent and error alike).
    Prune {
        /// e.g. 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
}

#[derive(Subcommand)]
enum ReportsCommand {
    /// List reports, newest first.
    List {
        /// Only reports seen within this long (e.g. 1h, 7d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Only reports of this type (csp-violation, network-error, …).
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one report in full.
    Show {
        /// The report's id.
        id: String,
    },
    /// Delete reports first received longer ago than this.
    Prune {
        /// e.g. 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
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
            // Build the checks too: a CA file that is not PEM, a URL the
            // driver refuses, are configuration errors like any other.
            if let Err(e) = dockerflow_sidecar::checks::Registry::from_config(&config) {
                eprintln!("dockerflow-sidecar: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            print!("{}", masked_toml(&config));
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config, overrides),
        Command::Reports { command } => reports(&config, command),
        Command::Hooks { command } => hooks(&config, command),
        Command::Drain => drain(&config),
    }
}

/// `drain`: POST /drain to this pod's admin listener.
fn drain(config: &Config) -> ExitCode {
    if !config.admin.enabled {
        eprintln!("dockerflow-sidecar: the admin listener is disabled (admin.enabled = false)");
        return ExitCode::FAILURE;
    }
    let token = match config.admin.token() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // A wildcard listener is reached on loopback (where, without a token,
    // the route answers).
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sent = runtime.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{addr}/drain"));
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.status()),
            Ok(Err(e)) => Err(format!("cannot reach the admin listener at {addr}: {e}")),
            Err(_) => Err(format!(
                "no answer from the admin listener at {addr} within 10s"
            )),
        }
    });
    match sent {
        Ok(status) if status.is_success() => {
            println!("draining");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("dockerflow-sidecar: POST /drain answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `reports list|show|prune`, straight on the state file.
fn reports(config: &Config, command: ReportsCommand) -> ExitCode {
    use dockerflow_sidecar::reports::store;
    let read_only = !matches!(command, ReportsCommand::Prune { .. });
    let conn = match dockerflow_sidecar::store::open_existing(&config.state.path, read_only) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = store::unix_ms(std::time::SystemTime::now());
    let ago = |d: Duration| now.saturating_sub(store::millis(d));
    let result = match command {
        ReportsCommand::List { since, kind, json } => {
            store::list(&conn, ago(since), kind.as_deref()).map(|rows| {
                if json {
                    for row in &rows {
                        println!("{}", report_json(row));
                    }
                } else {
                    println!(
                        "{:<24}  {:>5}  {:<20}  {:<16}  {:<36}  {:<30}  BLOCKED",
                        "LAST SEEN", "COUNT", "TYPE", "DIRECTIVE", "ID", "URL"
                    );
                    for row in &rows {
                        println!(
                            "{:<24}  {:>5}  {:<20}  {:<16}  {:<36}  {:<30}  {}",
                            when(row.last_seen),
                            row.count,
                            row.kind,
                            row.directive.as_deref().unwrap_or("-"),
                            row.id,
                            row.url.as_deref().unwrap_or("-"),
                            row.blocked_url.as_deref().unwrap_or("-")
                        );
                    }
                }
            })
        }
        ReportsCommand::Show { id } => store::show(&conn, &id).map(|row| match row {
            Some(row) => println!(
                "{}",
                serde_json::to_string_pretty(&report_json(&row)).unwrap_or_default()
            ),
            None => {
                eprintln!("dockerflow-sidecar: no report with id {id}");
                std::process::exit(1);
            }
        }),
        ReportsCommand::Prune { older_than } => {
            store::prune(&conn, ago(older_than)).map(|n| println!("deleted {n} reports"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dockerflow-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A stored report as JSON, its body parsed and its times readable.
fn report_json(row: &dockerflow_sidecar::reports::store::StoredReport) -> serde_json::Value {
    let mut value = serde_json::to_value(row).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        let body =
            serde_json::from_str(&row.body).unwrap_or(serde_json::Value::String(row.body.clone()));
        object.insert("body".into(), body);
        for key in ["created", "incident", "last_seen"] {
            if let Some(ms) = object.get(key).and_then(|v| v.as_i64()) {
                object.insert(key.into(), when(ms).into());
            }
        }
    }
    value
}

/// Unix ms as RFC 3339.
fn when(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

fn serve(config: Config, overrides: Overrides) -> ExitCode {
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

    // One single-threaded runtime per worker, each on a thread of its own
    // (this one is worker 0), as nginx runs one process per worker: a
    // connection stays on the worker that accepted it, so no wake-up crosses
    // to another CPU to steal its tasks (tokio's multi-thread scheduler paid
    // 0.33-0.38 futex calls a request for that at 1,000 req/s with two
    // workers; what they cost in CPU depends on the machine: BENCHMARKS.md).
    // Background work (hooks, mail, the admin listener, the trim's watcher)
    // runs on worker 0.
    let workers = config.server.workers();
    let mut runtimes = Vec::with_capacity(workers);
    for _ in 0..workers {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(trim::on_park)
            .build()
        {
            Ok(runtime) => runtimes.push(runtime),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the runtime");
                logger.flush();
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = runtimes.remove(0);
    let finished = tokio_util::sync::CancellationToken::new();
    let mut others = Vec::with_capacity(runtimes.len());
    let mut threads = Vec::with_capacity(runtimes.len());
    for (i, other) in runtimes.into_iter().enumerate() {
        let index = i + 1;
        others.push(other.handle().clone());
        let done = finished.clone();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                dockerflow_sidecar::worker::enter(index);
                // Runs what worker 0 spawns here until serving is over.
                other.block_on(done.cancelled());
                // Tunnels still open after the grace period are cut here.
                other.shutdown_timeout(Duration::from_millis(100));
            });
        match thread {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a worker thread");
                finished.cancel();
                logger.flush();
                return ExitCode::FAILURE;
            }
        }
    }

    let signal_logger = logger.clone();
    let run_logger = logger.clone();
    // Worker 0's runtime runs on this thread: it parks through
    // `on_thread_park` like the others, so the trim (src/trim.rs) collects
    // its heap too.
    let serving = async move {
        // Installed before the listener exists, so a signal that arrives as
        // soon as `listening` is logged is already ours, not the default
        // (which would kill the process without a drain).
        let mut signals = Signals::install()?;
        tokio::spawn(trim::watch(others.clone()));
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
        let reload: dockerflow_sidecar::Reload =
            Box::new(move || Config::load(&overrides).map_err(|e| e.to_string()));
        dockerflow_sidecar::run_with_reload(
            config,
            run_logger,
            async {
                let _ = first_rx.await;
            },
            Some(reload),
            &others,
        )
        .await
    };
    let result = runtime.block_on(async move {
        match tokio::spawn(serving).await {
            Ok(result) => result,
            // A panic only (release builds abort on one).
            Err(e) => Err(std::io::Error::other(e)),
        }
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
    finished.cancel();
    runtime.shutdown_timeout(Duration::from_millis(100));
    for thread in threads {
        let _ = thread.join();
    }
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

/// `hooks list|send|monitor|prune`, on the outbox in the state file.
fn hooks(config: &Config, command: HooksCommand) -> ExitCode {
    use dockerflow_sidecar::hooks::outbox;
    let fail = |e: String| {
        eprintln!("dockerflow-sidecar: {e}");
        ExitCode::FAILURE
    };
    let read_only = matches!(
        command,
        HooksCommand::List { .. } | HooksCommand::Monitor { .. }
    );
    let conn = match dockerflow_sidecar::store::open_existing(&config.state.path, read_only) {
        Ok(conn) => conn,
        Err(e) => return fail(e),
    };
    let now = dockerflow_sidecar::reports::store::unix_ms(std::time::SystemTime::now());
    match command {
        HooksCommand::List { status, hook, json } => {
            match outbox::list(&conn, status.as_deref(), hook.as_deref()) {
                Ok(rows) => {
                    if json {
                        for row in &rows {
                            println!("{}", serde_json::to_string(row).unwrap_or_default());
                        }
                    } else {
                        println!(
                            "{:<24}  {:<7}  {:>8}  {:<16}  {:<18}  {:<36}  LAST",
                            "CREATED", "STATUS", "ATTEMPTS", "HOOK", "EVENT", "ID"
                        );
                        for r in &rows {
                            let last = match (&r.last_status, &r.last_error) {
                                (_, Some(e)) => e.clone(),
                                (Some(s), None) => s.to_string(),
                                (None, None) => "-".into(),
                            };
                            println!(
                                "{:<24}  {:<7}  {:>8}  {:<16}  {:<18}  {:<36}  {last}",
                                when(r.created),
                                r.status,
                                r.attempts,
                                r.hook,
                                r.event_type,
                                r.id
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        HooksCommand::Monitor {
            status,
            limit,
            minutes_ago,
        } => {
            let before = now.saturating_sub(
                i64::try_from(minutes_ago.saturating_mul(60_000)).unwrap_or(i64::MAX),
            );
            match outbox::count(&conn, &status, before) {
                Ok(count) => {
                    println!("{count} {status} hook deliveries (limit {limit})");
                    if count > limit {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(e.to_string()),
            }
        }
        HooksCommand::Prune { older_than } => {
            let before = now.saturating_sub(dockerflow_sidecar::reports::store::millis(older_than));
            match outbox::prune(&conn, before) {
                Ok(n) => {
                    println!("deleted {n} hook deliveries");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        HooksCommand::Send { hook, ids } => {
            let ids = if ids.is_empty() {
                match outbox::list(&conn, None, hook.as_deref()) {
                    Ok(rows) => rows
                        .into_iter()
                        .filter(|r| r.status == "waiting" || r.status == "error")
                        .map(|r| r.id)
                        .collect(),
                    Err(e) => return fail(e.to_string()),
                }
            } else {
                ids
            };
            drop(conn);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return fail(e.to_string()),
            };
            let sent = runtime.block_on(async {
                // Counted nowhere: this process serves no /metrics.
                let hooks = dockerflow_sidecar::hooks::Hooks::new(config, Default::default())?;
                hooks.send_now(ids).await
            });
            match sent {
                Ok(done) => {
                    let mut failed = 0;
                    for (row, outcome) in &done {
                        if outcome.status != "sent" {
                            failed += 1;
                        }
                        println!(
                            "{}  {}  {}  {}",
                            row.id,
                            row.hook,
                            outcome.status,
                            outcome.last_error.as_deref().unwrap_or("")
                        );
                    }
                    println!("{} sent, {failed} not", done.len() - failed);
                    if failed > 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(e),
            }
        }
    }
}
