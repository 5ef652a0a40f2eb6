//! `/__heartbeat__`: python-dockerflow's response shape over the checks.

use http::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::body::ResponseBody;
use crate::checks::{Level, Registry, Report};
use crate::config::{HeartbeatConfig, HeartbeatDetails};

/// Runs the checks and renders the result.
pub struct Heartbeat {
    registry: Registry,
    failed_status: StatusCode,
    details: HeartbeatDetails,
}

impl Heartbeat {
    /// A heartbeat over `registry` with the configured status and exposure.
    pub fn new(registry: Registry, config: &HeartbeatConfig) -> Heartbeat {
        Heartbeat {
            registry,
            failed_status: config.failed_status.0,
            details: config.details,
        }
    }

    /// Answers the route: 503 while draining (checks are not run), else the
    /// checks' result, 200 when the worst level is below error.
    pub async fn respond(&self, draining: bool) -> Response<ResponseBody> {
        if draining {
            let body = serde_json::to_vec(&json!({"status": "draining"})).unwrap_or_default();
            return super::json(StatusCode::SERVICE_UNAVAILABLE, body);
        }
        let report = self.registry.run_all().await;
        let status = if report.level() < Level::ERROR {
            StatusCode::OK
        } else {
            self.failed_status
        };
        let body = serde_json::to_vec(&render(&report, self.details)).unwrap_or_default();
        super::json(status, body)
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
                let messages: Map<String, Value> = result
                    .messages
                    .iter()
                    .map(|m| (m.id.clone(), Value::from(m.text.clone())))
                    .collect();
                details.insert(
                    result.name.clone(),
                    json!({"status": level.name(), "level": level.0, "messages": messages}),
                );
            }
        }
        out.insert("checks".into(), Value::Object(checks));
        out.insert("details".into(), Value::Object(details));
    }
    Value::Object(out)
}
