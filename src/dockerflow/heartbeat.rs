//! `/__heartbeat__`: python-dockerflow's response shape over the checks, a
//! short cache with single flight (any number of concurrent polls cause one
//! round of checks, which runs in its own task so no poll can cancel it),
//! and the transitions that become events and log lines.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::body::ResponseBody;
use crate::checks::{CheckResult, Level, Registry, Report};
use crate::config::{HeartbeatConfig, HeartbeatDetails};
use crate::events::{Bus, CheckState, Event, EventData};

/// Runs the checks, caches the result, and renders it.
pub struct Heartbeat {
    inner: Arc<Inner>,
    failed_status: StatusCode,
    details: HeartbeatDetails,
}

/// What a round of checks needs; shared with the task that runs it.
struct Inner {
    registry: Registry,
    metrics: Arc<crate::metrics::Metrics>,
    ttl: Duration,
    bus: Bus,
    state: Mutex<State>,
}

/// A round in flight, awaited by every poll that arrives while it runs.
type Round = Shared<BoxFuture<'static, Arc<Report>>>;

/// The last round and what it means.
#[derive(Default)]
struct State {
    /// When the cached report's round finished, if any.
    at: Option<Instant>,
    /// The cached report.
    report: Arc<Report>,
    /// Each check's level in the cached report.
    levels: HashMap<String, Level>,
    /// Whether the cached report failed (worst level ≥ error).
    failing: bool,
    /// The round running now, if any.
    running: Option<Round>,
}

impl Heartbeat {
    /// A heartbeat over `registry`, publishing transitions on `bus`.
    pub fn new(
        registry: Registry,
        config: &HeartbeatConfig,
        bus: Bus,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Heartbeat {
        Heartbeat {
            inner: Arc::new(Inner {
                registry,
                metrics,
                ttl: config.cache_ttl,
                bus,
                state: Mutex::new(State::default()),
            }),
            failed_status: config.failed_status.0,
            details: config.details,
        }
    }

    /// Answers the route: 503 while draining (checks are not run), else the
    /// checks' result, 200 when the worst level is below error.
    pub async fn respond(&self, draining: bool) -> Response<ResponseBody> {
        self.respond_with(draining, self.details).await
    }

    /// [`respond`](Self::respond) with `details` whatever the public
    /// setting (the admin listener shows everything).
    pub async fn respond_with(
        &self,
        draining: bool,
        details: HeartbeatDetails,
    ) -> Response<ResponseBody> {
        if draining {
            let body = serde_json::to_vec(&json!({"status": "draining"})).unwrap_or_default();
            return super::json(StatusCode::SERVICE_UNAVAILABLE, body);
        }
        let report = self.report().await;
        let status = if report.level() < Level::ERROR {
            StatusCode::OK
        } else {
            self.failed_status
        };
        let body = serde_json::to_vec(&render(&report, details)).unwrap_or_default();
        super::json(status, body)
    }

    /// The current report: the cached one while fresh, else the round
    /// running now (single flight, whatever the TTL), else a new round.
    ///
    /// The round runs in its own task: a poll that gives up does not cancel
    /// it, and its result is recorded whoever is still waiting.
    pub async fn report(&self) -> Arc<Report> {
        let round = {
            let mut state = self.inner.lock();
            if let Some(at) = state.at {
                if at.elapsed() < self.inner.ttl {
                    return state.report.clone();
                }
            }
            match &state.running {
                Some(round) => round.clone(),
                None => {
                    let inner = self.inner.clone();
                    let task = tokio::spawn(async move {
                        let report = Arc::new(inner.registry.run_all().await);
                        inner.record(&report);
                        report
                    });
                    let round: Round = async move { task.await.unwrap_or_default() }
                        .boxed()
                        .shared();
                    state.running = Some(round.clone());
                    round
                }
            }
        };
        round.await
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Caches `report`, logs the checks whose level changed and publishes
    /// pass/fail changes.
    fn record(&self, report: &Arc<Report>) {
        let round: Vec<(&str, u8, Duration)> = report
            .results()
            .iter()
            .map(|r| (r.name.as_str(), r.level().0, r.duration))
            .collect();
        self.metrics.checks(&round);
        self.metrics
            .heartbeat_level
            .set(i64::from(report.level().0));
        let mut state = self.lock();
        let levels: HashMap<String, Level> = report
            .results()
            .iter()
            .map(|r| (r.name.clone(), r.level()))
            .collect();
        let mut changes: Vec<(&str, Level, Option<Level>)> = levels
            .iter()
            .map(|(name, level)| {
                (
                    name.as_str(),
                    state.levels.get(name).copied().unwrap_or(Level::OK),
                    Some(*level),
                )
            })
            .filter(|(_, before, after)| Some(*before) != *after)
            .collect();
        // A check that disappeared (a merged one no longer reported) recovered.
        changes.extend(
            state
                .levels
                .iter()
                .filter(|(name, level)| **level > Level::OK && !levels.contains_key(*name))
                .map(|(name, level)| (name.as_str(), *level, None)),
        );
        changes.sort_by(|a, b| a.0.cmp(b.0));
        if !changes.is_empty() {
            // The line is as severe as the worst level a changed check went to.
            let worst_new = changes
                .iter()
                .filter_map(|c| c.2)
                .max()
                .unwrap_or(Level::OK);
            let changed: Vec<String> = changes
                .iter()
                .map(|(name, before, after)| {
                    format!(
                        "{name}: {} → {}",
                        before.name(),
                        after.map_or("gone", |l| l.name())
                    )
                })
                .collect();
            let changed = changed.join(", ");
            let status = report.level().name();
            if worst_new >= Level::ERROR {
                tracing::error!(target: "heartbeat", status, changed = %changed, "heartbeat checks changed");
            } else if worst_new >= Level::WARNING {
                tracing::warn!(target: "heartbeat", status, changed = %changed, "heartbeat checks changed");
            } else {
                tracing::info!(target: "heartbeat", status, changed = %changed, "heartbeat checks changed");
            }
        }

        let failing = report.level() >= Level::ERROR;
        if failing && !state.failing {
            let checks = report
                .results()
                .iter()
                .filter(|r| r.level() > Level::OK)
                .map(|r| (r.name.clone(), check_state(r)))
                .collect();
            self.bus.publish(Event::new(
                "heartbeat.failed",
                EventData::HeartbeatFailed {
                    status: report.level().name(),
                    checks,
                },
            ));
        } else if !failing && state.failing {
            let mut recovered: Vec<String> = state
                .levels
                .iter()
                .filter(|(name, level)| {
                    **level >= Level::ERROR && levels.get(*name).is_none_or(|l| *l < Level::ERROR)
                })
                .map(|(name, _)| name.clone())
                .collect();
            recovered.sort();
            self.bus.publish(Event::new(
                "heartbeat.passed",
                EventData::HeartbeatPassed {
                    status: report.level().name(),
                    recovered,
                },
            ));
        }
        state.failing = failing;
        state.levels = levels;
        state.report = report.clone();
        state.at = Some(Instant::now());
        state.running = None;
    }
}

/// A check as shown in `details` and in events.
fn check_state(result: &CheckResult) -> CheckState {
    let level = result.level();
    CheckState {
        status: level.name(),
        level: level.0,
        messages: result
            .messages
            .iter()
            .map(|m| (m.id.clone(), m.text.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// `{"status", "checks", "details"}`; `details` lists only checks above ok.
fn render(report: &Report, exposure: HeartbeatDetails) -> Value {
    let mut out = Map::new();
    out.insert("status".into(), Value::from(report.level().name()));
    if exposure == HeartbeatDetails::Full {
        let mut checks = Map::new();
        let mut details = Map::new();
        for result in report.results() {
            let level = result.level();
            checks.insert(result.name.clone(), Value::from(level.name()));
            if level > Level::OK {
                details.insert(
                    result.name.clone(),
                    serde_json::to_value(check_state(result)).unwrap_or_default(),
                );
            }
        }
        out.insert("checks".into(), Value::Object(checks));
        out.insert("details".into(), Value::Object(details));
    }
    Value::Object(out)
}
