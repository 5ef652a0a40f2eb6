//! `/__heartbeat__`: python-dockerflow's response shape over the checks, a
//! short cache with single flight (any number of concurrent polls cause one
//! round of checks), and the transitions that become events and log lines.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::body::ResponseBody;
use crate::checks::{CheckResult, Level, Registry, Report};
use crate::config::{HeartbeatConfig, HeartbeatDetails};
use crate::events::{Bus, CheckState, Event, EventData};

/// Runs the checks, caches the result, and renders it.
pub struct Heartbeat {
    registry: Registry,
    failed_status: StatusCode,
    details: HeartbeatDetails,
    ttl: Duration,
    bus: Bus,
    /// Held while a round of checks runs: concurrent polls wait here and
    /// then read the fresh result instead of starting rounds of their own.
    state: tokio::sync::Mutex<State>,
}

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
}

impl Heartbeat {
    /// A heartbeat over `registry`, publishing transitions on `bus`.
    pub fn new(registry: Registry, config: &HeartbeatConfig, bus: Bus) -> Heartbeat {
        Heartbeat {
            registry,
            failed_status: config.failed_status.0,
            details: config.details,
            ttl: config.cache_ttl,
            bus,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Answers the route: 503 while draining (checks are not run), else the
    /// checks' result, 200 when the worst level is below error.
    pub async fn respond(&self, draining: bool) -> Response<ResponseBody> {
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
        let body = serde_json::to_vec(&render(&report, self.details)).unwrap_or_default();
        super::json(status, body)
    }

    /// The current report: the cached one while fresh, or one that finished
    /// while this call waited (single flight, whatever the TTL), else a new
    /// round.
    pub async fn report(&self) -> Arc<Report> {
        let asked = Instant::now();
        let mut state = self.state.lock().await;
        if let Some(at) = state.at {
            if at >= asked || at.elapsed() < self.ttl {
                return state.report.clone();
            }
        }
        let report = Arc::new(self.registry.run_all().await);
        self.record(&mut state, &report);
        state.at = Some(Instant::now());
        state.report = report.clone();
        report
    }

    /// Logs the checks whose level changed and publishes pass/fail changes.
    fn record(&self, state: &mut State, report: &Report) {
        let levels: HashMap<String, Level> = report
            .results()
            .iter()
            .map(|r| (r.name.clone(), r.level()))
            .collect();
        let mut changed: Vec<String> = levels
            .iter()
            .filter(|(name, level)| {
                state.levels.get(*name).copied().unwrap_or(Level::OK) != **level
            })
            .map(|(name, level)| {
                let before = state.levels.get(name).copied().unwrap_or(Level::OK);
                format!("{name}: {} → {}", before.name(), level.name())
            })
            .collect();
        // A check that disappeared (a merged one no longer reported) recovered.
        changed.extend(
            state
                .levels
                .iter()
                .filter(|(name, level)| **level > Level::OK && !levels.contains_key(*name))
                .map(|(name, level)| format!("{name}: {} → gone", level.name())),
        );
        changed.sort();
        if !changed.is_empty() {
            let worst = report.level();
            let changed = changed.join(", ");
            let status = worst.name();
            if worst >= Level::ERROR {
                tracing::error!(target: "heartbeat", status, changed = %changed, "heartbeat checks changed");
            } else if worst >= Level::WARNING {
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
