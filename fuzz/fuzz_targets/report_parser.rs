#![no_main]
//! A report body as the intake sees it after its limits: UTF-8, JSON, then
//! `schema::parse`, then the cleaning `Intake::accept` does before a report
//! is logged, stored or published (both with and without
//! `keep_query_strings`).
//!
//! Beyond "no panic", what the code documents: a batch counts every element
//! (reports + skipped), a report's normalised body agrees with its fields,
//! extracted text is never blank, the report type is bounded and free of
//! control characters, and after cleaning no URL keeps a query, fragment,
//! path parameter or credentials, and no field holds a control character
//! or more than `MAX_FIELD` characters.

use std::sync::LazyLock;

use dockerflow_sidecar::config::ReportsConfig;
use dockerflow_sidecar::reports::schema::{self, Report, SchemaError};
use dockerflow_sidecar::scrub::{Scrubber, Secrets};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The intake's cleaning, compiled from the very file the library uses (the
/// module is private to the library).
#[allow(dead_code)]
#[path = "../../src/reports/clean.rs"]
mod clean;
use clean::{SAMPLE_KEYS, URL_KEYS};

/// The request's User-Agent, used when a report carries none.
const AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0";
/// `reports::schema`'s bound on a report type, in characters.
const MAX_TYPE: usize = 64;

static SCRUBBER: LazyLock<Scrubber> = LazyLock::new(Scrubber::default);

fuzz_target!(|data: &[u8]| {
    let max_reports = ReportsConfig::default().max_batch_reports;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let elements = match &value {
        Value::Array(items) => Some(items.len()),
        Value::Object(_) => None,
        _ => Some(0),
    };

    // Without a request User-Agent the same reports come out.
    let without_agent = schema::parse(value.clone(), None, max_reports);
    match schema::parse(value, Some(AGENT), max_reports) {
        Ok(batch) => {
            assert!(!batch.reports.is_empty(), "an Ok batch holds a report");
            match elements {
                Some(n) => {
                    assert!(n <= max_reports);
                    assert_eq!(batch.reports.len() + batch.skipped, n);
                }
                None => assert_eq!((batch.reports.len(), batch.skipped), (1, 0)),
            }
            let other = without_agent.expect("the User-Agent decides nothing");
            assert_eq!(other.reports.len(), batch.reports.len());
            for (report, other) in batch.reports.iter().zip(&other.reports) {
                assert_eq!(report.kind, other.kind);
                check_report(report);
                accept(report, false);
                accept(report, true);
            }
        }
        Err(e) => {
            assert_eq!(without_agent.err(), Some(e.clone()));
            match e {
                SchemaError::Empty => assert_eq!(elements, Some(0)),
                SchemaError::TooMany(n) => {
                    assert_eq!(elements, Some(n));
                    assert!(n > max_reports);
                }
                SchemaError::UnknownShape => {}
            }
            assert!(!e.to_string().is_empty());
        }
    }
});

/// What `schema` promises about one report.
fn check_report(report: &Report) {
    assert!(report.kind.chars().count() <= MAX_TYPE, "{:?}", report.kind);
    assert!(
        !report.kind.chars().any(char::is_control),
        "{:?}",
        report.kind
    );
    for field in [
        &report.document_url,
        &report.directive,
        &report.blocked_url,
        &report.disposition,
        &report.source_file,
        &report.user_agent,
    ]
    .into_iter()
    .flatten()
    {
        assert!(!field.trim().is_empty(), "blank field in {report:?}");
    }
    // The request's agent fills in for a report without one.
    assert!(report.user_agent.is_some());
    if report.kind == "csp-violation" {
        if let Some(directive) = &report.directive {
            // Only the legacy `effective-directive` is taken whole.
            if report.body["body"].get("effective-directive").is_none() {
                assert!(
                    !directive.contains(char::is_whitespace),
                    "directive {directive:?}"
                );
            }
        }
    }
    let body = report.body.as_object().expect("the body is an object");
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "body", "type", "url", "user_agent"]);
    assert_eq!(body["type"], Value::from(report.kind.as_str()));
    assert_eq!(body["age"], Value::from(report.age_ms));
    assert_eq!(body["url"], Value::from(report.document_url.as_deref()));
    assert_eq!(
        body["user_agent"],
        Value::from(report.user_agent.as_deref())
    );
    assert!(body["body"].is_object());
    let _ = report.is_extension_noise();
}

/// `Intake::accept`'s cleaning of one report, with its promises.
fn accept(report: &Report, keep_query_strings: bool) {
    let mut secrets = Secrets::default();
    let mut url = |u: &Option<String>| {
        u.as_deref().map(|u| {
            if keep_query_strings {
                clean::text(&SCRUBBER.url(u, &mut secrets))
            } else {
                let cut = clean::cut_query(u);
                assert_url_cut(&cut);
                assert_eq!(clean::cut_query(&cut), cut, "cutting twice changes {u:?}");
                clean::text(&cut)
            }
        })
    };
    let fields = [
        Some(clean::text(&report.kind)),
        url(&report.document_url),
        report.directive.as_deref().map(clean::text),
        url(&report.blocked_url),
        report.disposition.as_deref().map(clean::text),
        url(&report.source_file),
        report.user_agent.as_deref().map(clean::text),
    ];
    for field in fields.iter().flatten() {
        assert!(!field.chars().any(char::is_control), "{field:?}");
        assert!(field.chars().count() <= clean::MAX_FIELD);
    }
    let mut body = report.body.clone();
    if !keep_query_strings {
        clean::cut_queries_in(&mut body);
        assert_body_cut(None, &body);
    }
    SCRUBBER.json(&mut body, &mut secrets);
    // What the store writes.
    let stored = body.to_string();
    assert!(serde_json::from_str::<Value>(&stored).is_ok());
}

/// No query, fragment or path parameters, and no userinfo in the authority.
fn assert_url_cut(url: &str) {
    assert!(!url.contains(['?', '#', ';']), "{url:?}");
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        assert!(!authority.contains('@'), "{url:?}");
    }
}

/// Every URL in `value` cut, every sample emptied (`key` is the object key
/// `value` sits under, lowercased).
fn assert_body_cut(key: Option<&str>, value: &Value) {
    match value {
        Value::String(s) => {
            if key.is_some_and(|k| SAMPLE_KEYS.contains(&k)) {
                assert!(s.is_empty(), "sample {key:?} kept: {s:?}");
            } else if s.contains("://") || key.is_some_and(|k| URL_KEYS.contains(&k)) {
                assert_url_cut(s);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| assert_body_cut(None, v)),
        Value::Object(map) => {
            for (k, v) in map {
                assert_body_cut(Some(&k.to_ascii_lowercase()), v);
            }
        }
        _ => {}
    }
}
