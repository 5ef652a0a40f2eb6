#![no_main]
//! Hook bodies: `Template::new`, `check` and `render` on arbitrary template
//! source and arbitrary event contents (the event strings come from
//! requests: paths, headers, user agents, report fields).
//!
//! Input: `template NUL content-type NUL event`, where the event part is
//! read by `arbitrary` (so seeds stay readable: the template first). An
//! empty template is the default body (the event itself).
//!
//! Beyond "no panic": whatever the event holds, the default body and the
//! documented JSON templates (README, the example config, the tests) render
//! to valid JSON, and a string printed inside quotes comes back out of the
//! JSON unchanged.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use dockerflow_sidecar::config::{HookConfig, HookMethod};
use dockerflow_sidecar::events::{BrokenLink, CheckState, Event, EventData, UpstreamError, KINDS};
use dockerflow_sidecar::hooks::Template;
use dockerflow_sidecar::reports::ReportFields;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Templates operators are shown, all JSON.
const DOCUMENTED: [&str; 3] = [
    // README and config/dockerflow-sidecar.toml.
    r#"{"text": "{{ event.type }} on {{ host }}: {{ event.data.status }}"}"#,
    // tests/hooks.rs.
    r#"{"text": "{{ event.type }} from {{ event.data.user_agent }} on {{ service }}", "data": {{ event.data }}}"#,
    // src/hooks/template.rs's tests.
    r#"{"text": "{{ event.type }} on {{ host }}: {{ event.data.recovered[0] }}", "data": {{ event.data }}}"#,
];

#[derive(Arbitrary, Debug)]
enum FuzzEvent {
    HeartbeatFailed(BTreeMap<String, (u8, BTreeMap<String, String>)>),
    HeartbeatPassed(Vec<String>),
    Report(Box<Report>),
    Upstream(Box<Upstream>),
    Broken(Box<Broken>),
}

#[derive(Arbitrary, Debug)]
struct Report {
    kind: String,
    url: Option<String>,
    directive: Option<String>,
    blocked_url: Option<String>,
    disposition: Option<String>,
    source_file: Option<String>,
    line: Option<u64>,
    column: Option<u64>,
    status_code: Option<u64>,
    user_agent: Option<String>,
    age: u64,
}

#[derive(Arbitrary, Debug)]
struct Upstream {
    method: String,
    host: String,
    path: String,
    query: Option<String>,
    status: u16,
    request_id: String,
    duration_ms: u64,
    client: String,
    internal_ip: bool,
    user_agent: String,
    headers: BTreeMap<String, String>,
    body: Option<String>,
    cause: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct Broken {
    method: String,
    host: String,
    path: String,
    query: Option<String>,
    referer: String,
    internal: bool,
    user_agent: String,
    client: String,
    request_id: String,
}

impl FuzzEvent {
    /// The event, and its user agent as `{{ event.data.user_agent }}` prints it.
    fn build(self) -> (Event, String) {
        let (kind, data, agent) = match self {
            FuzzEvent::HeartbeatFailed(checks) => {
                let checks = checks
                    .into_iter()
                    .map(|(name, (level, messages))| {
                        let status = match level {
                            0..=19 => "ok",
                            20..=29 => "info",
                            30..=39 => "warning",
                            _ => "error",
                        };
                        let state = CheckState {
                            status,
                            level,
                            messages,
                        };
                        (name, state)
                    })
                    .collect();
                let data = EventData::HeartbeatFailed {
                    status: "error",
                    checks,
                };
                (0, data, String::new())
            }
            FuzzEvent::HeartbeatPassed(recovered) => {
                let data = EventData::HeartbeatPassed {
                    status: "ok",
                    recovered,
                };
                (1, data, String::new())
            }
            FuzzEvent::Report(r) => {
                let agent = r.user_agent.clone().unwrap_or_default();
                let fields = ReportFields {
                    id: "00000000-0000-7000-8000-000000000000".into(),
                    kind: r.kind,
                    url: r.url,
                    directive: r.directive,
                    blocked_url: r.blocked_url,
                    disposition: r.disposition,
                    source_file: r.source_file,
                    line: r.line,
                    column: r.column,
                    status_code: r.status_code,
                    user_agent: r.user_agent,
                    age: r.age,
                };
                (2, EventData::ReportReceived(Box::new(fields)), agent)
            }
            FuzzEvent::Upstream(u) => {
                let agent = u.user_agent.clone();
                let error = UpstreamError {
                    method: u.method,
                    host: u.host,
                    path: u.path,
                    query: u.query,
                    status: u.status,
                    request_id: u.request_id,
                    duration_ms: u.duration_ms,
                    client: u.client,
                    internal_ip: u.internal_ip,
                    user_agent: u.user_agent,
                    headers: u.headers,
                    body: u.body,
                    cause: u.cause,
                };
                (3, EventData::UpstreamError(Box::new(error)), agent)
            }
            FuzzEvent::Broken(b) => {
                let agent = b.user_agent.clone();
                let link = BrokenLink {
                    method: b.method,
                    host: b.host,
                    path: b.path,
                    query: b.query,
                    referer: b.referer,
                    internal: b.internal,
                    user_agent: b.user_agent,
                    client: b.client,
                    request_id: b.request_id,
                };
                (4, EventData::BrokenLink(Box::new(link)), agent)
            }
        };
        (Event::new(KINDS[kind], data), agent)
    }
}

/// The service name templates see: as hostile as event values.
const SERVICE: &str = "svc \" \\ \n {{ x }}";

/// The documented templates, compiled once, with a JSON content type.
static DOCUMENTED_HOOKS: LazyLock<Vec<(HookConfig, Template)>> = LazyLock::new(|| {
    DOCUMENTED
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let mut hook = hook(Some((*source).to_owned()), "application/json".into());
            if i == 2 {
                // Only heartbeat.passed has `recovered`.
                hook.events = vec!["heartbeat.passed".into()];
            }
            let template = Template::new(&hook, SERVICE).expect("a documented template compiles");
            template
                .check(&hook)
                .expect("a documented template passes check");
            (hook, template)
        })
        .collect()
});

fn hook(template: Option<String>, content_type: String) -> HookConfig {
    HookConfig {
        name: "fuzz".into(),
        events: KINDS.iter().map(|k| (*k).to_owned()).collect(),
        url: "http://127.0.0.1:9/".into(),
        method: HookMethod::Post,
        headers: BTreeMap::new(),
        content_type,
        template,
        secret: None,
        secret_file: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let source = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let content_type = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let rest = Unstructured::new(parts.next().unwrap_or_default());
    let Ok(event) = FuzzEvent::arbitrary_take_rest(rest) else {
        return;
    };
    let (event, agent) = event.build();

    // The default body: the event itself, whatever the content type.
    let default = hook(None, content_type.clone());
    let body = Template::new(&default, SERVICE)
        .and_then(|t| t.render(&event))
        .expect("the default body always renders");
    let parsed: Value = serde_json::from_str(&body).expect("the default body is JSON");
    assert_eq!(parsed, serde_json::to_value(&event).unwrap());

    for (i, (_, template)) in DOCUMENTED_HOOKS.iter().enumerate() {
        // `recovered[0]` of an event without `recovered` fails, as any
        // lookup on an undefined value does in minijinja's lenient mode.
        let body = match template.render(&event) {
            Ok(body) => body,
            Err(e) => {
                assert!(i == 2 && event.kind != "heartbeat.passed", "{i}: {e}");
                continue;
            }
        };
        let parsed: Value = match serde_json::from_str(&body) {
            Ok(parsed) => parsed,
            Err(e) => panic!("documented template {i} rendered invalid JSON ({e}): {body}"),
        };
        if i == 1 {
            let text = format!("{} from {agent} on {SERVICE}", event.kind);
            assert_eq!(parsed["text"], Value::from(text));
            assert_eq!(parsed["data"], serde_json::to_value(&event.data).unwrap());
        }
    }

    // The fuzzed template, as the config loader and the hook sender use it.
    if source.is_empty() {
        return;
    }
    let fuzzed = hook(Some(source), content_type);
    if let Ok(template) = Template::new(&fuzzed, SERVICE) {
        let _ = template.check(&fuzzed);
        let _ = template.render(&event);
    }
});
