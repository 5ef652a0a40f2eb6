//! Hook bodies: the default `{"id","type","time","data"}`, or a minijinja
//! template with `event`, `host` and `service` in scope. When the content
//! type is JSON, every value printed into the template is JSON-escaped (a
//! quote or backslash in a value can never break the payload): strings
//! without their quotes, so `"{{ event.type }}"` works, and objects and
//! lists as JSON, so `{{ event.data }}` does too.

use minijinja::value::Rest;
use minijinja::{Environment, Error, ErrorKind, State, Value};

use crate::config::HookConfig;
use crate::events::{Event, EventData};

/// Instructions one render may run: hundreds of times what a real payload
/// template needs, and a few milliseconds of work; past it the render fails
/// (and `check-config` says so) instead of hanging.
const FUEL: u64 = 1_000_000;

/// Longest [`Template::verify`] may take. Fuel counts
/// the template's instructions, not the work inside one: printing (or
/// `join`, `list`, `in`) a lazy sequence such as `[1] * 10**14` runs for
/// hours on one instruction. A real template renders its samples in
/// milliseconds.
const CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The widest field `format` may pad to (digits of a width or precision).
const FORMAT_DIGITS: usize = 4;

/// minijinja's `format` filter, refusing a width or precision of more than
/// four digits: `"%0000000000291084181163285253s"|format(x)` asked for
/// exabytes, and a failed allocation aborts the process (found by the
/// template_renderer fuzz target).
fn bounded_format(state: &State, format: &Value, args: Rest<Value>) -> Result<Value, Error> {
    if format.as_str().is_some_and(too_wide) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "format: a width or precision of more than 4 digits",
        ));
    }
    minijinja::filters::format(state, format, args)
}

/// minijinja's `indent` filter, refusing a width over 9,999:
/// `indent(100000000000000)` allocated the whole indentation first, and the
/// failed allocation aborted the process.
fn bounded_indent(state: &State, value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let too_wide = |v: &Value| v.as_usize().is_some_and(|n| n > 9_999);
    // A positional width, or `width=` in the keyword arguments (a map).
    let mut widths = args
        .iter()
        .flat_map(|a| [a.clone(), a.get_attr("width").unwrap_or_default()]);
    if widths.any(|v| too_wide(&v)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "indent: a width over 9999",
        ));
    }
    let all: Vec<Value> = std::iter::once(value.clone())
        .chain(args.iter().cloned())
        .collect();
    Value::from_function(minijinja::filters::indent).call(state, &all)
}

/// True when a printf conversion in `spec` has a digit run (width or
/// precision, leading zeros included) longer than [`FORMAT_DIGITS`].
fn too_wide(spec: &str) -> bool {
    let bytes = spec.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'%') {
            i += 2;
            continue;
        }
        let mut run = 0;
        i += 1;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'0'..=b'9' => run += 1,
                b'#' | b'-' | b' ' | b'+' | b'.' => run = 0,
                _ => break,
            }
            if run > FORMAT_DIGITS {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// How one hook's bodies are made.
pub struct Template {
    env: Environment<'static>,
    source: Option<String>,
    json: bool,
    host: String,
    service: String,
}

impl Template {
    /// The template of `hook` (compiled, not yet tried).
    pub fn new(hook: &HookConfig, service: &str) -> Result<Template, String> {
        let json = is_json(&hook.content_type);
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.add_filter("format", bounded_format);
        env.add_filter("indent", bounded_indent);
        if json {
            env.set_formatter(|out, _state, value| {
                let text = json_text(value);
                out.write_str(&text).map_err(minijinja::Error::from)
            });
        }
        if let Some(source) = &hook.template {
            env.template_from_str(source)
                .map_err(|e| format!("the template does not compile: {e}"))?;
        }
        Ok(Template {
            env,
            source: hook.template.clone(),
            json,
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            service: service.to_owned(),
        })
    }

    /// The body for `event`.
    pub fn render(&self, event: &Event) -> Result<String, String> {
        let Some(source) = &self.source else {
            return serde_json::to_string(event).map_err(|e| e.to_string());
        };
        let context = minijinja::context! {
            event => Value::from_serialize(event),
            host => self.host.clone(),
            service => self.service.clone(),
        };
        self.env
            .render_str(source, context)
            .map_err(|e| format!("the template failed: {e}"))
    }

    /// Compiles the template of `hook` and renders a sample of every event
    /// it takes ([`Template::check`]), failing when that takes longer than
    /// [`CHECK_LIMIT`]. Both run on a thread of their own (compiling folds
    /// constant expressions, so `{{ 2 in [1] * 10**14 }}` hangs there), left
    /// behind if they never finish (Rust cannot stop a thread): check-config
    /// and start-up then exit with the error, and a reload keeps the running
    /// configuration.
    pub fn verify(hook: &HookConfig, service: &str) -> Result<(), String> {
        let (hook, service) = (hook.clone(), service.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("template-check".into())
            .spawn(move || {
                let _ = tx.send(Template::new(&hook, &service).and_then(|t| t.check(&hook)));
            })
            .map_err(|e| format!("cannot start the template check: {e}"))?;
        match rx.recv_timeout(CHECK_LIMIT) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the template did not compile and render its samples within {} s: it walks \
                 something too large (such as `[1] * 10**14`), which fuel does not count",
                CHECK_LIMIT.as_secs()
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("the template check failed".into())
            }
        }
    }

    /// Renders a sample of every event the hook takes, with hostile values,
    /// and, for JSON, checks that the result parses.
    pub fn check(&self, hook: &HookConfig) -> Result<(), String> {
        for kind in &hook.events {
            let Some(sample) = sample(kind) else { continue };
            let body = self.render(&sample)?;
            if self.json {
                serde_json::from_str::<serde_json::Value>(&body).map_err(|e| {
                    format!(
                        "a sample `{kind}` event renders to invalid JSON ({e}): {}",
                        body.chars().take(200).collect::<String>()
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// `application/json`, `application/*+json`, with or without parameters.
fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// A value as it goes into a JSON template.
fn json_text(value: &Value) -> String {
    if value.is_undefined() || value.is_none() {
        return String::new();
    }
    if let Some(text) = value.as_str() {
        let quoted = serde_json::to_string(text).unwrap_or_default();
        return quoted[1..quoted.len().saturating_sub(1).max(1)].to_owned();
    }
    serde_json::to_string(value).unwrap_or_default()
}

/// A sample event of `kind`, its strings full of characters that break naive
/// templates.
fn sample(kind: &str) -> Option<Event> {
    let hostile = "quote \" backslash \\ newline \n tab \t <b>&amp;</b> {{ not a template }}";
    let data = match kind {
        "heartbeat.failed" => {
            let mut checks = std::collections::BTreeMap::new();
            checks.insert(
                "database".to_owned(),
                crate::events::CheckState {
                    status: "error",
                    level: 40,
                    messages: [("sidecar.E001".to_owned(), hostile.to_owned())]
                        .into_iter()
                        .collect(),
                },
            );
            EventData::HeartbeatFailed {
                status: "error",
                checks,
            }
        }
        "heartbeat.passed" => EventData::HeartbeatPassed {
            status: "ok",
            recovered: vec![hostile.to_owned()],
        },
        "report.received" => EventData::ReportReceived(Box::new(crate::reports::ReportFields {
            id: "00000000-0000-7000-8000-000000000000".into(),
            kind: "csp-violation".into(),
            url: Some(hostile.into()),
            directive: Some("script-src-elem".into()),
            blocked_url: Some(hostile.into()),
            disposition: Some("enforce".into()),
            source_file: None,
            line: Some(1),
            column: Some(2),
            status_code: Some(200),
            user_agent: Some(hostile.into()),
            age: 0,
        })),
        "upstream.error" => EventData::UpstreamError(Box::new(crate::events::UpstreamError {
            method: "POST".into(),
            host: hostile.into(),
            path: hostile.into(),
            query: Some(hostile.into()),
            status: 502,
            request_id: "rid".into(),
            duration_ms: 1,
            client: "192.0.2.1".into(),
            internal_ip: false,
            user_agent: hostile.into(),
            headers: [(hostile.to_owned(), hostile.to_owned())]
                .into_iter()
                .collect(),
            body: Some(hostile.into()),
            cause: Some(hostile.into()),
        })),
        "broken_link" => EventData::BrokenLink(Box::new(crate::events::BrokenLink {
            method: "GET".into(),
            host: hostile.into(),
            path: hostile.into(),
            query: Some(hostile.into()),
            referer: hostile.into(),
            internal: true,
            user_agent: hostile.into(),
            client: "192.0.2.1".into(),
            request_id: "rid".into(),
        })),
        _ => return None,
    };
    let kind = crate::events::KINDS.iter().find(|k| **k == kind)?;
    Some(Event::new(kind, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(template: &str, content_type: &str) -> HookConfig {
        HookConfig {
            name: "t".into(),
            events: vec!["heartbeat.passed".into()],
            url: "http://x/".into(),
            method: Default::default(),
            headers: Default::default(),
            content_type: content_type.into(),
            template: Some(template.into()),
            secret: None,
            secret_file: None,
        }
    }

    #[test]
    fn json_templates_escape_every_value() {
        let h = hook(
            r#"{"text": "{{ event.type }} on {{ host }}: {{ event.data.recovered[0] }}", "data": {{ event.data }}}"#,
            "application/json",
        );
        let template = Template::new(&h, "svc").unwrap();
        template.check(&h).unwrap();
        let body = template
            .render(&sample("heartbeat.passed").unwrap())
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(parsed["text"]
            .as_str()
            .unwrap()
            .starts_with("heartbeat.passed on "));
        assert!(parsed["text"]
            .as_str()
            .unwrap()
            .contains("quote \" backslash \\ newline \n"));
        assert_eq!(parsed["data"]["status"], "ok");
    }

    #[test]
    fn a_template_that_breaks_json_is_refused() {
        let h = hook(r#"{"text": {{ event.type }}}"#, "application/json");
        let err = Template::new(&h, "svc").unwrap().check(&h).unwrap_err();
        assert!(err.contains("invalid JSON"), "{err}");
        let h = hook(r#"{"text": "{{ event.type "}"#, "application/json");
        assert!(Template::new(&h, "svc").is_err());
    }

    #[test]
    fn non_json_templates_are_left_alone() {
        let h = hook("status={{ event.data.status }}", "text/plain");
        let template = Template::new(&h, "svc").unwrap();
        assert_eq!(
            template
                .render(&sample("heartbeat.passed").unwrap())
                .unwrap(),
            "status=ok"
        );
    }

    /// `format` and `indent` still work within bounds, and refuse a width
    /// that would exhaust memory instead of aborting the process.
    #[test]
    fn format_and_indent_are_bounded() {
        let render = |template: &str| {
            Template::new(&hook(template, "text/plain"), "svc")
                .unwrap()
                .render(&sample("heartbeat.passed").unwrap())
        };
        assert_eq!(
            render(r#"{{ "%-4s|%05d|%%12345"|format("ab", 42) }}"#).unwrap(),
            "ab  |00042|%12345"
        );
        assert_eq!(
            render(r#"{{ "a\nb"|indent(2, true) }}"#).unwrap(),
            "  a\n  b"
        );
        assert_eq!(
            render(r#"{{ "a\nb"|indent(width=3, first=true) }}"#).unwrap(),
            "   a\n   b"
        );
        for wide in [
            r#"{{ "%0000000000291084181163285253s"|format("x") }}"#,
            r#"{{ "%.100000f"|format(1.5) }}"#,
            r#"{{ "x"|indent(100000000000000) }}"#,
            r#"{{ "x"|indent(width=100000000000000) }}"#,
        ] {
            let err = render(wide).unwrap_err();
            assert!(
                err.contains("format: a width") || err.contains("indent: a width"),
                "{wide}: {err}"
            );
        }
    }
}
