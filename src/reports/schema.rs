//! What browsers send, and the fields the sidecar extracts from it.
//!
//! Shapes: the legacy CSP `report-uri` body (`{"csp-report": {...}}`, one per
//! POST), the Reporting API batch (`[{age, type, url, user_agent, body}]`,
//! also a single such object), Expect-CT (`{"expect-ct-report": {...}}`) and
//! HPKP (a flat object with `known-pins`). Numbers that arrive as strings are
//! accepted; anything else that is JSON but none of these is an unknown shape.

use serde_json::{Map, Value};

/// URL schemes of browser extensions: reports about them are noise.
const EXTENSION_SCHEMES: [&str; 7] = [
    "chrome-extension",
    "moz-extension",
    "safari-extension",
    "safari-web-extension",
    "ms-browser-extension",
    "edge-extension",
    "opera-extension",
];

/// Longest report type kept as given (unknown types are stored as sent).
const MAX_TYPE: usize = 64;

/// One report, understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `csp-violation`, `network-error`, `expect-ct`, `hpkp`, … or an
    /// unknown type as sent.
    pub kind: String,
    /// The document the report is about.
    pub document_url: Option<String>,
    /// The effective directive, feature or error type.
    pub directive: Option<String>,
    /// What was blocked.
    pub blocked_url: Option<String>,
    /// `enforce` or `report`.
    pub disposition: Option<String>,
    /// Where in the page it happened.
    pub source_file: Option<String>,
    /// Line in `source_file`.
    pub line: Option<u64>,
    /// Column in `source_file`.
    pub column: Option<u64>,
    /// HTTP status of the document (or of the failed request, for NEL).
    pub status_code: Option<u64>,
    /// The browser.
    pub user_agent: Option<String>,
    /// How long before it was sent the incident happened, in milliseconds.
    pub age_ms: u64,
    /// The report in one shape: `{"type", "url", "age", "user_agent", "body"}`.
    pub body: Value,
}

/// Why a body is not a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaError {
    /// A batch with no reports in it.
    Empty,
    /// JSON, but none of the shapes browsers send.
    UnknownShape,
    /// A batch with more reports than allowed.
    TooMany(usize),
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaError::Empty => write!(f, "no reports in the batch"),
            SchemaError::UnknownShape => write!(f, "not a known report shape"),
            SchemaError::TooMany(n) => write!(f, "{n} reports in one batch is too many"),
        }
    }
}

/// The reports in a parsed body, and how many elements of a batch were not
/// reports (skipped).
#[derive(Debug)]
pub struct Batch {
    /// The reports understood.
    pub reports: Vec<Report>,
    /// Batch elements that were not report objects.
    pub skipped: usize,
}

/// Understands `value`. `user_agent` is the request's, used when a report
/// does not carry its own.
pub fn parse(
    value: Value,
    user_agent: Option<&str>,
    max_reports: usize,
) -> Result<Batch, SchemaError> {
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(SchemaError::Empty);
            }
            if items.len() > max_reports {
                return Err(SchemaError::TooMany(items.len()));
            }
            let total = items.len();
            let reports: Vec<Report> = items
                .into_iter()
                .filter_map(|item| match item {
                    Value::Object(object) => reporting_api(object, user_agent),
                    _ => None,
                })
                .collect();
            if reports.is_empty() {
                return Err(SchemaError::UnknownShape);
            }
            Ok(Batch {
                skipped: total - reports.len(),
                reports,
            })
        }
        Value::Object(object) => single(object, user_agent)
            .map(|report| Batch {
                reports: vec![report],
                skipped: 0,
            })
            .ok_or(SchemaError::UnknownShape),
        _ => Err(SchemaError::UnknownShape),
    }
}

/// A top-level object: legacy CSP, Expect-CT, HPKP or one Reporting API report.
fn single(mut object: Map<String, Value>, user_agent: Option<&str>) -> Option<Report> {
    if let Some(Value::Object(csp)) = object.remove("csp-report") {
        // An empty or unrelated object inside is not a CSP report.
        const CSP_KEYS: [&str; 4] = [
            "document-uri",
            "violated-directive",
            "effective-directive",
            "blocked-uri",
        ];
        return CSP_KEYS
            .iter()
            .any(|k| csp.contains_key(*k))
            .then(|| legacy_csp(csp, user_agent));
    }
    if let Some(Value::Object(ct)) = object.remove("expect-ct-report") {
        return Some(certificate_report("expect-ct", ct, user_agent));
    }
    if object.contains_key("known-pins") || object.contains_key("noted-hostname") {
        return Some(certificate_report("hpkp", object, user_agent));
    }
    reporting_api(object, user_agent)
}

/// `{"csp-report": {...}}` as sent to `report-uri`.
fn legacy_csp(csp: Map<String, Value>, user_agent: Option<&str>) -> Report {
    let directive = text(&csp, &["effective-directive"]).or_else(|| {
        text(&csp, &["violated-directive"])
            .and_then(|v| v.split_whitespace().next().map(str::to_owned))
    });
    let document_url = text(&csp, &["document-uri", "document-url"]);
    let body = Value::Object(csp);
    Report {
        kind: "csp-violation".into(),
        directive,
        blocked_url: text_in(&body, &["blocked-uri", "blocked-url"]),
        disposition: text_in(&body, &["disposition"]).or_else(|| Some("enforce".into())),
        source_file: text_in(&body, &["source-file"]),
        line: number_in(&body, &["line-number"]),
        column: number_in(&body, &["column-number"]),
        status_code: number_in(&body, &["status-code"]),
        user_agent: user_agent.map(str::to_owned),
        age_ms: 0,
        body: normalised(
            "csp-violation",
            document_url.as_deref(),
            0,
            user_agent,
            body,
        ),
        document_url,
    }
}

/// Expect-CT and HPKP reports: about a host, not a document.
fn certificate_report(kind: &str, report: Map<String, Value>, user_agent: Option<&str>) -> Report {
    let host = text(&report, &["hostname"]);
    let port = number(&report, &["port"]);
    let document_url = host.map(|h| match port {
        Some(p) if p != 443 => format!("https://{h}:{p}/"),
        _ => format!("https://{h}/"),
    });
    let body = Value::Object(report);
    Report {
        kind: kind.into(),
        directive: None,
        blocked_url: None,
        disposition: None,
        source_file: None,
        line: None,
        column: None,
        status_code: None,
        user_agent: user_agent.map(str::to_owned),
        age_ms: 0,
        body: normalised(kind, document_url.as_deref(), 0, user_agent, body),
        document_url,
    }
}

/// One Reporting API report: `{age, type, url, user_agent, body}`.
fn reporting_api(report: Map<String, Value>, request_agent: Option<&str>) -> Option<Report> {
    let kind = clean_type(report.get("type")?.as_str()?);
    let inner = match report.get("body") {
        Some(Value::Object(body)) => body.clone(),
        Some(Value::Null) | None => Map::new(),
        Some(_) => return None,
    };
    let age_ms = number(&report, &["age"]).unwrap_or(0);
    let user_agent = text(&report, &["user_agent"]).or_else(|| request_agent.map(str::to_owned));
    let document_url = text(&inner, &["documentURL", "documentURI", "document-uri"])
        .or_else(|| text(&report, &["url"]));
    let directive = match kind.as_str() {
        "csp-violation" => text(&inner, &["effectiveDirective", "violatedDirective"])
            .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned()),
        "network-error" => text(&inner, &["type"]),
        _ => text(&inner, &["featureId", "policyId", "id", "type"]),
    };
    let body = Value::Object(inner);
    Some(Report {
        directive,
        blocked_url: text_in(&body, &["blockedURL", "blockedURI", "blocked-uri"]),
        disposition: text_in(&body, &["disposition"]),
        source_file: text_in(&body, &["sourceFile", "source-file"]),
        line: number_in(&body, &["lineNumber", "line-number"]),
        column: number_in(&body, &["columnNumber", "column-number"]),
        status_code: number_in(&body, &["statusCode", "status_code", "status-code"]),
        age_ms,
        body: normalised(
            &kind,
            document_url.as_deref(),
            age_ms,
            user_agent.as_deref(),
            body,
        ),
        document_url,
        user_agent,
        kind,
    })
}

/// `{"type", "url", "age", "user_agent", "body"}`.
fn normalised(
    kind: &str,
    url: Option<&str>,
    age_ms: u64,
    user_agent: Option<&str>,
    body: Value,
) -> Value {
    serde_json::json!({"type": kind, "url": url, "age": age_ms, "user_agent": user_agent, "body": body})
}

/// A report type as sent, without control characters and bounded.
fn clean_type(kind: &str) -> String {
    kind.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TYPE)
        .collect()
}

/// The first of `keys` holding a non-blank string (or a number, as text).
fn text(object: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match object.get(*k)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn text_in(body: &Value, keys: &[&str]) -> Option<String> {
    body.as_object().and_then(|o| text(o, keys))
}

/// The first of `keys` holding a non-negative number, or a string of one.
fn number(object: &Map<String, Value>, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| match object.get(*k)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    })
}

fn number_in(body: &Value, keys: &[&str]) -> Option<u64> {
    body.as_object().and_then(|o| number(o, keys))
}

impl Report {
    /// True when the blocked or source URL is a browser extension's.
    pub fn is_extension_noise(&self) -> bool {
        [&self.blocked_url, &self.source_file]
            .into_iter()
            .flatten()
            .any(|url| is_extension(url))
    }
}

/// `chrome-extension`, `chrome-extension:` or `chrome-extension://…`, any case.
fn is_extension(url: &str) -> bool {
    let url = url.trim().to_ascii_lowercase();
    EXTENSION_SCHEMES.iter().any(|scheme| {
        url == *scheme
            || url
                .strip_prefix(scheme)
                .is_some_and(|rest| rest.starts_with(':'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(value: Value) -> Report {
        let mut batch = parse(value, Some("request-agent"), 100).unwrap();
        assert_eq!(batch.reports.len(), 1);
        batch.reports.remove(0)
    }

    #[test]
    fn legacy_csp_report_from_firefox() {
        let report = one(json!({"csp-report": {
            "blocked-uri": "https://evil.example/x.js",
            "column-number": 12,
            "document-uri": "https://app.example/page?token=abc",
            "line-number": "34",
            "original-policy": "script-src 'self'; report-uri /__cspreport__",
            "referrer": "",
            "source-file": "https://app.example/page",
            "violated-directive": "script-src-elem 'self'"
        }}));
        assert_eq!(report.kind, "csp-violation");
        assert_eq!(report.directive.as_deref(), Some("script-src-elem"));
        assert_eq!(
            report.document_url.as_deref(),
            Some("https://app.example/page?token=abc")
        );
        assert_eq!(
            report.blocked_url.as_deref(),
            Some("https://evil.example/x.js")
        );
        assert_eq!(report.disposition.as_deref(), Some("enforce"));
        assert_eq!((report.line, report.column), (Some(34), Some(12)));
        assert_eq!(report.user_agent.as_deref(), Some("request-agent"));
        assert_eq!(report.body["type"], "csp-violation");
        assert_eq!(report.body["body"]["referrer"], "");
    }

    #[test]
    fn effective_directive_wins_over_violated_directive() {
        let report = one(
            json!({"csp-report": {"effective-directive": "img-src", "violated-directive": "default-src 'none'", "blocked-uri": "inline", "status-code": "200"}}),
        );
        assert_eq!(report.directive.as_deref(), Some("img-src"));
        assert_eq!(report.status_code, Some(200));
    }

    #[test]
    fn chromium_reporting_api_batch_mixing_types() {
        let batch = parse(
            json!([
                {"age": 10, "type": "csp-violation", "url": "https://app.example/", "user_agent": "Chrome/156",
                 "body": {"blockedURL": "inline", "columnNumber": 5, "disposition": "enforce",
                          "documentURL": "https://app.example/", "effectiveDirective": "script-src-elem",
                          "lineNumber": 9, "originalPolicy": "script-src 'self'", "referrer": "",
                          "sample": "", "sourceFile": "https://app.example/", "statusCode": 200}},
                {"age": 0, "type": "deprecation", "url": "https://app.example/", "user_agent": "Chrome/156",
                 "body": {"id": "UnloadHandler", "message": "Unload is deprecated", "lineNumber": 1, "columnNumber": 2, "sourceFile": "https://app.example/a.js"}},
                {"age": 3, "type": "permissions-policy-violation", "url": "https://app.example/", "user_agent": "Chrome/156",
                 "body": {"featureId": "camera", "policyId": "camera-policy", "disposition": "enforce", "message": "camera is not allowed"}},
                {"age": 1, "type": "some-future-type", "url": "https://app.example/", "body": {"x": 1}},
                "not a report",
                42
            ]),
            None,
            100,
        )
        .unwrap();
        assert_eq!(batch.skipped, 2);
        let kinds: Vec<&str> = batch.reports.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "csp-violation",
                "deprecation",
                "permissions-policy-violation",
                "some-future-type"
            ]
        );
        let csp = &batch.reports[0];
        assert_eq!(csp.directive.as_deref(), Some("script-src-elem"));
        assert_eq!(
            (csp.line, csp.column, csp.status_code),
            (Some(9), Some(5), Some(200))
        );
        assert_eq!(csp.age_ms, 10);
        assert_eq!(csp.user_agent.as_deref(), Some("Chrome/156"));
        assert_eq!(batch.reports[1].directive.as_deref(), Some("UnloadHandler"));
        assert_eq!(batch.reports[2].directive.as_deref(), Some("camera"));
        assert_eq!(
            batch.reports[3].document_url.as_deref(),
            Some("https://app.example/")
        );
    }

    #[test]
    fn network_error_logging() {
        let report = one(
            json!([{"age": 29, "type": "network-error", "url": "https://app.example/api", "user_agent": "Chrome",
            "body": {"elapsed_time": 45, "method": "GET", "phase": "connection", "protocol": "http/1.1",
                     "referrer": "", "sampling_fraction": 1.0, "server_ip": "203.0.113.1", "status_code": 0, "type": "tcp.refused"}}]),
        );
        assert_eq!(report.kind, "network-error");
        assert_eq!(report.directive.as_deref(), Some("tcp.refused"));
        assert_eq!(report.status_code, Some(0));
        assert_eq!(
            report.document_url.as_deref(),
            Some("https://app.example/api")
        );
    }

    #[test]
    fn expect_ct_and_hpkp() {
        let ct = one(
            json!({"expect-ct-report": {"date-time": "2026-11-21T10:00:00Z", "hostname": "app.example", "port": 443,
            "effective-expiration-date": "2026-12-21T10:00:00Z", "served-certificate-chain": ["MIIB"], "validated-certificate-chain": [], "scts": []}}),
        );
        assert_eq!(ct.kind, "expect-ct");
        assert_eq!(ct.document_url.as_deref(), Some("https://app.example/"));
        let hpkp = one(
            json!({"date-time": "2026-11-21T10:00:00Z", "hostname": "app.example", "port": "8443",
            "effective-expiration-date": "2026-12-21T10:00:00Z", "include-subdomains": false, "noted-hostname": "app.example",
            "served-certificate-chain": ["MIIB"], "validated-certificate-chain": ["MIIB"], "known-pins": ["pin-sha256=\"x\""]}),
        );
        assert_eq!(hpkp.kind, "hpkp");
        assert_eq!(
            hpkp.document_url.as_deref(),
            Some("https://app.example:8443/")
        );
    }

    #[test]
    fn shapes_that_are_not_reports() {
        assert_eq!(parse(json!([]), None, 100).unwrap_err(), SchemaError::Empty);
        assert_eq!(
            parse(json!([1, "x", null]), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        assert_eq!(
            parse(json!({"hello": "world"}), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        assert_eq!(
            parse(json!({"csp-report": "text"}), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        assert_eq!(
            parse(json!("string"), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        assert_eq!(
            parse(json!([{"type": 5, "body": {}}]), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        assert_eq!(
            parse(json!([{"type": "x", "body": 5}]), None, 100).unwrap_err(),
            SchemaError::UnknownShape
        );
        let many: Vec<Value> = (0..101).map(|_| json!({"type": "x", "body": {}})).collect();
        assert_eq!(
            parse(Value::Array(many), None, 100).unwrap_err(),
            SchemaError::TooMany(101)
        );
    }

    #[test]
    fn extension_urls_are_noise_bare_or_with_a_path() {
        for url in [
            "chrome-extension",
            "moz-extension://abc/script.js",
            "Safari-Extension:",
            "safari-web-extension://x",
        ] {
            let report = one(
                json!({"csp-report": {"blocked-uri": url, "violated-directive": "script-src"}}),
            );
            assert!(report.is_extension_noise(), "{url}");
        }
        let report = one(
            json!({"csp-report": {"blocked-uri": "https://chrome-extension.example/", "violated-directive": "img-src"}}),
        );
        assert!(!report.is_extension_noise());
        let report = one(
            json!({"csp-report": {"blocked-uri": "inline", "source-file": "moz-extension", "violated-directive": "script-src"}}),
        );
        assert!(report.is_extension_noise());
    }
}
