//! dockerflow-sidecar: a reverse proxy that answers the Dockerflow routes,
//! logs one mozlog line per request and forwards everything else to the app.
//!
//! [`run`] is what the binary starts; see ARCHITECTURE.md for the map.

pub mod admin;
pub mod body;
pub mod checks;
pub mod config;
pub mod dockerflow;
pub mod error_reports;
pub mod events;
pub mod h1;
pub mod hooks;
pub mod mail;
pub mod metrics;
pub mod mozlog;
pub mod pool;
pub mod proxy;
pub mod reports;
pub mod router;
pub mod scrub;
pub mod server;
pub mod server_h1;
pub mod server_tls;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::future::Future;
use std::sync::Arc;

use http::HeaderName;
use tokio::net::TcpListener;

use crate::checks::Registry;
use crate::config::Config;
use crate::dockerflow::Heartbeat;
use crate::events::Bus;
use crate::mozlog::Logger;
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;

/// An error and its causes on one line, each cause once.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Everything a request needs, built once at start-up.
pub struct App {
    /// The effective configuration.
    pub config: Config,
    /// Writes request.summary lines.
    pub logger: Arc<Logger>,
    /// The request id header name.
    pub rid_header: HeaderName,
    /// Forwards to the upstream.
    pub proxy: Proxy,
    /// Runs the heartbeat checks.
    pub heartbeat: Heartbeat,
    /// Drain and stop state.
    pub shutdown: Shutdown,
    /// Where events are published.
    pub bus: Bus,
    /// Browser security report intake.
    pub reports: reports::Intake,
    /// Outgoing webhooks and their outbox.
    pub hooks: Arc<hooks::Hooks>,
    /// Error mail to admins and managers.
    pub mail: Arc<mail::Mailer>,
    /// Masks secrets in everything that leaves the sidecar.
    pub scrubber: Arc<scrub::Scrubber>,
    /// Every Prometheus metric.
    pub metrics: Arc<metrics::Metrics>,
    /// The listener's certificate and acceptor, when it terminates TLS.
    pub tls: Option<(Arc<server_tls::Certificates>, tokio_rustls::TlsAcceptor)>,
}

impl App {
    /// Builds the app state from `config`; fails when a heartbeat check
    /// cannot be built (an unreadable CA file, say) or the state file cannot
    /// be opened.
    pub fn new(config: Config, logger: Arc<Logger>) -> Result<App, String> {
        let shutdown = Shutdown::default();
        let bus = Bus::default();
        let metrics = Arc::new(metrics::Metrics::new());
        let scrubber = Arc::new(scrub::Scrubber::new(&config.errors.sensitive_patterns())?);
        let errors = error_reports::ErrorReports::new(&config, scrubber.clone(), bus.clone())?;
        let proxy = Proxy::new(&config, shutdown.tracker().clone(), errors, metrics.clone())?;
        let heartbeat = Heartbeat::new(
            Registry::from_config(&config)?,
            &config.heartbeat,
            bus.clone(),
            metrics.clone(),
        );
        let reports = reports::Intake::new(
            &config,
            bus.clone(),
            logger.clone(),
            scrubber.clone(),
            metrics.clone(),
        )?;
        let hooks = Arc::new(hooks::Hooks::new(&config, metrics.clone())?);
        let mail = Arc::new(mail::Mailer::new(&config, metrics.clone())?);
        let tls = match config.tls.enabled() {
            true => {
                let certificates = server_tls::Certificates::load(&config.tls)?;
                let acceptor =
                    tokio_rustls::TlsAcceptor::from(Arc::new(certificates.server_config()?));
                Some((certificates, acceptor))
            }
            false => None,
        };
        Ok(App {
            reports,
            hooks,
            mail,
            scrubber,
            metrics,
            tls,
            rid_header: config.logging.request_id_header.name.clone(),
            config,
            logger,
            proxy,
            heartbeat,
            shutdown,
            bus,
        })
    }
}

/// Binds the listener, builds the app, and serves until `signal` resolves
/// (see [`serve`]).
pub async fn run(
    config: Config,
    logger: Arc<Logger>,
    signal: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with_reload(config, logger, signal, None, &[]).await
}

/// Reads the configuration again (on SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// [`run`], and on SIGHUP `reload` the configuration and apply its hooks
/// without a restart (other settings need one). A configuration that does
/// not load is logged and the running one kept. `workers` are the other
/// workers' runtimes, which accept and serve connections too (see
/// [`server::serve`]); everything else runs on the calling one.
pub async fn run_with_reload(
    mut config: Config,
    logger: Arc<Logger>,
    signal: impl Future<Output = ()>,
    reload: Option<Reload>,
    workers: &[tokio::runtime::Handle],
) -> std::io::Result<()> {
    // Installed before listening: SIGHUP's default action would end the process.
    let hangups = match reload {
        Some(reload) => Some((
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
            Arc::<dyn Fn() -> Result<Config, String> + Send + Sync>::from(reload),
        )),
        None => None,
    };
    let mut sockets = server::bind(config.listen, 1 + workers.len()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
    })?;
    let listener = TcpListener::from_std(sockets.remove(0))?;
    let others = workers.iter().cloned().zip(sockets).collect();
    // The workers that serve, counted once: the pool keeps a stack for each
    // (a caller's own runtime, with no others, is one worker however many
    // threads it has: its threads all use the first stack).
    config.server.worker_threads = 1 + workers.len();
    let app = Arc::new(App::new(config, logger).map_err(std::io::Error::other)?);
    if let Some((mut hangups, reload)) = hangups {
        let app = app.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                if let Some((certificates, _)) = &app.tls {
                    let certificates = certificates.clone();
                    match tokio::task::spawn_blocking(move || certificates.reload()).await {
                        Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
                        Ok(Err(e)) => tracing::error!(
                            error = %e,
                            "TLS certificate not reloaded: the previous one is still served"
                        ),
                        Err(e) => tracing::error!(error = %e, "TLS certificate reload failed"),
                    }
                }
                // Off the runtime's threads: loading reads files and renders
                // each hook template's samples (up to 3 s when one is stuck).
                let load = reload.clone();
                let loaded = tokio::task::spawn_blocking(move || load())
                    .await
                    .unwrap_or_else(|e| Err(format!("the reload failed: {e}")));
                match loaded.and_then(|config| app.hooks.reload(&config)) {
                    Ok(hooks) => tracing::info!(
                        hooks = hooks as u64,
                        "configuration reloaded: hooks applied"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "configuration not reloaded; the running one is kept")
                    }
                }
            }
        });
    }
    serve_on(app, listener, signal, others).await
}

/// Logs `listening` with the bound address and serves `listener` until
/// `signal` resolves; then drains, and returns when every connection and
/// tunnel has finished or the grace period is over, and every accepted
/// report is stored. Tests start an [`App`] this way to reach its bus.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_on(app, listener, signal, Vec::new()).await
}

/// [`serve`], with `others` (the other workers' runtimes, each with its
/// socket from [`server::bind`]) accepting and serving connections too.
pub async fn serve_on(
    app: Arc<App>,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
    others: Vec<(tokio::runtime::Handle, std::net::TcpListener)>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    // Before `listening`: once that line is out, every listener is up.
    if let Some(admin) = admin::start(&app).await? {
        tracing::info!(addr = %admin, "admin listening");
    }
    tracing::info!(
        addr = %addr,
        upstream = %app.config.upstream.url,
        tls = app.tls.is_some(),
        workers = (1 + others.len()) as u64,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    if let Some((certificates, _)) = &app.tls {
        certificates.watch(app.config.tls.reload_interval);
    }
    app.hooks.start(&app.bus);
    app.mail.start(&app.bus);
    server::serve(app.clone(), listener, signal, others).await;
    // Every accepted report is stored before the process exits.
    let flushing = app.clone();
    let flushed = tokio::task::spawn_blocking(move || {
        flushing.reports.flush(std::time::Duration::from_secs(30))
    })
    .await;
    if !matches!(flushed, Ok(true)) {
        tracing::error!("reports still queued at exit could not all be stored within 30s");
    }
    // Mail already decided on goes out, within the mail timeout.
    app.mail.flush().await;
    Ok(())
}
