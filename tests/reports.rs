//! Browser security report intake: what browsers really send, what tools and
//! attackers send, and what happens to each.

mod common;

use std::time::Duration;

use common::{request, Sidecar, SidecarBuilder, Upstream};
use serde_json::{json, Value};

const CSP: &str = "application/csp-report";
const REPORTS: &str = "application/reports+json";

async fn post(
    sidecar: &Sidecar,
    content_type: &str,
    body: impl Into<bytes::Bytes>,
) -> common::Reply {
    request(
        "POST",
        &sidecar.url("/__cspreport__"),
        &[
            ("content-type", content_type),
            ("user-agent", "Mozilla/5.0 test"),
        ],
        body,
    )
    .await
}

/// The stored reports, through the CLI, once `n` are there.
fn stored(sidecar: &Sidecar, n: usize) -> Vec<Value> {
    let end = std::time::Instant::now() + common::DEADLINE;
    loop {
        let out = sidecar.cli(&["reports", "list", "--json", "--since", "1h"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            std::time::Instant::now() < end,
            "{} of {n} reports stored",
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `report` log lines once `n` are there.
fn logged(sidecar: &Sidecar, n: usize) -> Vec<Value> {
    sidecar
        .stdout
        .wait_for_count("report lines", n, |l| l.contains("\"Type\":\"report\""))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn legacy_csp() -> Value {
    json!({"csp-report": {
        "document-uri": "https://app.example/account?token=secret123#x",
        "referrer": "https://app.example/?from=mail",
        "violated-directive": "script-src-elem",
        "effective-directive": "script-src-elem",
        "original-policy": "default-src 'self'; report-uri /__cspreport__",
        "disposition": "enforce",
        "blocked-uri": "https://evil.example/steal.js?session=abc",
        "line-number": "12",
        "column-number": 34,
        "source-file": "https://app.example/static/app.js",
        "status-code": 200,
        "script-sample": ""
    }})
}

#[tokio::test]
async fn legacy_csp_report_is_answered_logged_and_stored_without_query_strings() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let reply = post(
        &sidecar,
        "application/csp-report; charset=utf-8",
        legacy_csp().to_string(),
    )
    .await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));

    let line = &logged(&sidecar, 1)[0];
    assert_eq!(line["Severity"], 4);
    let fields = &line["Fields"];
    assert_eq!(fields["type"], "csp-violation");
    assert_eq!(fields["url"], "https://app.example/account");
    assert_eq!(fields["directive"], "script-src-elem");
    assert_eq!(fields["blocked_url"], "https://evil.example/steal.js");
    assert_eq!(fields["line"], 12);
    assert_eq!(fields["column"], 34);
    assert_eq!(fields["status_code"], 200);
    assert_eq!(fields["user_agent"], "Mozilla/5.0 test");
    assert!(!line.to_string().contains("secret123") && !line.to_string().contains("session=abc"));

    let rows = stored(&sidecar, 1);
    let row = &rows[0];
    assert_eq!(row["id"], fields["id"]);
    assert_eq!(row["type"], "csp-violation");
    assert_eq!(row["count"], 1);
    assert_eq!(row["body"]["type"], "csp-violation");
    assert_eq!(row["body"]["body"]["referrer"], "https://app.example/");
    assert!(!row.to_string().contains("secret123"), "{row}");

    let shown = sidecar.cli(&["reports", "show", row["id"].as_str().unwrap()]);
    assert!(shown.status.success());
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["directive"], "script-src-elem");
    assert_eq!(app.hits(), 0, "reports are not forwarded by default");
}

#[tokio::test]
async fn chromium_batch_mixing_types_and_every_shape() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let batch = json!([
        {"age": 1200, "type": "csp-violation", "url": "https://app.example/", "user_agent": "Chrome/156",
         "body": {"blockedURL": "inline", "columnNumber": 9, "disposition": "report", "documentURL": "https://app.example/",
                  "effectiveDirective": "style-src-attr", "lineNumber": 3, "originalPolicy": "style-src 'self'",
                  "referrer": "", "sample": "color: red", "sourceFile": "https://app.example/", "statusCode": 200}},
        {"age": 5, "type": "network-error", "url": "https://api.example/v1", "user_agent": "Chrome/156",
         "body": {"elapsed_time": 18, "method": "POST", "phase": "connection", "protocol": "h2", "referrer": "https://app.example/",
                  "sampling_fraction": 1.0, "server_ip": "203.0.113.9", "status_code": 0, "type": "tcp.timed_out"}},
        {"age": 0, "type": "permissions-policy-violation", "url": "https://app.example/", "user_agent": "Chrome/156",
         "body": {"featureId": "geolocation", "policyId": "geo", "disposition": "enforce", "message": "not allowed",
                  "sourceFile": "https://app.example/app.js", "lineNumber": "7", "columnNumber": "21"}},
        {"age": 0, "type": "deprecation", "url": "https://app.example/", "user_agent": "Chrome/156",
         "body": {"id": "MutationEvents", "anticipatedRemoval": "2026-12-01", "message": "gone soon"}},
        {"age": 0, "type": "coep", "url": "https://app.example/", "user_agent": "Chrome/156",
         "body": {"type": "corp", "blockedURL": "https://cdn.example/img.png", "disposition": "enforce", "destination": "image"}},
        {"age": 0, "type": "crash", "url": "https://app.example/", "user_agent": "Chrome/156", "body": {"reason": "oom"}}
    ]);
    assert_eq!(post(&sidecar, REPORTS, batch.to_string()).await.status, 204);
    let ct = json!({"expect-ct-report": {"date-time": "2026-11-21T10:00:00Z", "hostname": "app.example", "port": 443,
        "effective-expiration-date": "2026-12-21T10:00:00Z", "served-certificate-chain": ["MIIB"], "validated-certificate-chain": [], "scts": []}});
    assert_eq!(
        post(
            &sidecar,
            "application/expect-ct-report+json",
            ct.to_string()
        )
        .await
        .status,
        204
    );
    let hpkp = json!({"date-time": "2026-11-21T10:00:00Z", "hostname": "app.example", "port": 443,
        "effective-expiration-date": "2026-12-21T10:00:00Z", "include-subdomains": false, "noted-hostname": "app.example",
        "served-certificate-chain": ["MIIB"], "validated-certificate-chain": ["MIIB"], "known-pins": ["pin-sha256=\"x\""]});
    assert_eq!(
        post(&sidecar, "application/json", hpkp.to_string())
            .await
            .status,
        204
    );

    let lines = logged(&sidecar, 8);
    let mut kinds: Vec<String> = lines
        .iter()
        .map(|l| l["Fields"]["type"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "coep",
            "crash",
            "csp-violation",
            "deprecation",
            "expect-ct",
            "hpkp",
            "network-error",
            "permissions-policy-violation"
        ]
    );
    let by_type =
        |kind: &str| lines.iter().find(|l| l["Fields"]["type"] == kind).unwrap()["Fields"].clone();
    assert_eq!(by_type("csp-violation")["directive"], "style-src-attr");
    assert_eq!(by_type("csp-violation")["disposition"], "report");
    assert_eq!(by_type("csp-violation")["age"], 1200);
    assert_eq!(by_type("network-error")["directive"], "tcp.timed_out");
    assert_eq!(
        by_type("permissions-policy-violation")["directive"],
        "geolocation"
    );
    assert_eq!(
        by_type("permissions-policy-violation")["line"],
        7,
        "numbers sent as strings are numbers"
    );
    assert_eq!(
        by_type("coep")["blocked_url"],
        "https://cdn.example/img.png"
    );
    assert_eq!(by_type("expect-ct")["url"], "https://app.example/");
    let rows = stored(&sidecar, 8);
    let csp = rows.iter().find(|r| r["type"] == "csp-violation").unwrap();
    let (created, incident) = (
        csp["created"].as_str().unwrap(),
        csp["incident"].as_str().unwrap(),
    );
    assert!(
        incident < created,
        "incident = received - age: {incident} vs {created}"
    );
}

#[tokio::test]
async fn bad_bodies_get_a_400_with_a_reason_and_are_not_stored() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (REPORTS, b"[]".to_vec(), "no reports"),
        (
            REPORTS,
            b"[1, \"two\", null]".to_vec(),
            "not a known report shape",
        ),
        (
            CSP,
            b"{\"hello\": \"world\"}".to_vec(),
            "not a known report shape",
        ),
        (
            CSP,
            b"{\"csp-report\": 5}".to_vec(),
            "not a known report shape",
        ),
        (CSP, b"{\"csp-report\": {".to_vec(), "not JSON"),
        (CSP, vec![b'{', 0xff, 0xfe, b'}'], "not UTF-8"),
        (CSP, b"".to_vec(), "not JSON"),
        (
            REPORTS,
            b"\"just a string\"".to_vec(),
            "not a known report shape",
        ),
    ];
    for (content_type, body, reason) in cases {
        let reply = post(&sidecar, content_type, body.clone()).await;
        assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&reply.body).contains(reason),
            "{:?} → {:?}",
            String::from_utf8_lossy(&body),
            reply.body
        );
    }
    // A batch with some non-objects keeps the reports it has.
    let mixed = json!([42, {"type": "csp-violation", "url": "https://a.example/", "body": {"effectiveDirective": "img-src"}}]);
    assert_eq!(post(&sidecar, REPORTS, mixed.to_string()).await.status, 204);
    assert_eq!(stored(&sidecar, 1).len(), 1);
}

#[tokio::test]
async fn methods_content_types_and_preflight() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let url = sidecar.url("/__cspreport__");
    let get = request("GET", &url, &[], "").await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST, OPTIONS"));
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        assert_eq!(
            post(&sidecar, content_type, legacy_csp().to_string())
                .await
                .status,
            415,
            "{content_type}"
        );
    }
    assert_eq!(
        request("POST", &url, &[], legacy_csp().to_string())
            .await
            .status,
        415,
        "no content type"
    );
    let preflight = request(
        "OPTIONS",
        &url,
        &[
            ("origin", "https://other.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        "",
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(preflight.header("access-control-max-age"), Some("86400"));
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn size_limits_are_checked_before_parsing() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let padding = "x".repeat(70 * 1024);
    let big = json!({"csp-report": {"document-uri": "https://a.example/", "violated-directive": "img-src", "script-sample": padding}});
    assert_eq!(post(&sidecar, CSP, big.to_string()).await.status, 413);
    // Without Content-Length (chunked), the limit holds while reading.
    let response = common::raw(
        sidecar.addr,
        format!(
            "POST /__cspreport__ HTTP/1.1\r\nHost: h\r\nContent-Type: application/csp-report\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            big.to_string().len(),
            big
        )
        .as_bytes(),
    );
    assert!(
        response.starts_with("HTTP/1.1 413"),
        "{}",
        &response[..40.min(response.len())]
    );
    // The same body is fine as a batch (1 MiB limit), but not 101 reports.
    let report = json!({"type": "csp-violation", "url": "https://a.example/", "body": {"effectiveDirective": "img-src"}});
    let many: Vec<Value> = (0..101).map(|_| report.clone()).collect();
    let reply = post(&sidecar, REPORTS, Value::Array(many).to_string()).await;
    assert_eq!(reply.status, 413);
    assert!(String::from_utf8_lossy(&reply.body).contains("101 reports"));
}

/// Sends `n` reports as fast as it can, each from `client(i)` (an
/// X-Forwarded-For value, or none); returns the statuses and how long it took.
async fn flood(
    sidecar: &Sidecar,
    n: usize,
    client: impl Fn(usize) -> Option<String>,
) -> (Vec<u16>, f64) {
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for i in 0..n {
        let report = json!({"csp-report": {"document-uri": format!("https://a.example/{i}"), "violated-directive": "img-src"}});
        let forwarded = client(i);
        let mut headers = vec![("content-type", CSP)];
        if let Some(ip) = forwarded.as_deref() {
            headers.push(("x-forwarded-for", ip));
        }
        statuses.push(
            request(
                "POST",
                &sidecar.url("/__cspreport__"),
                &headers,
                report.to_string(),
            )
            .await
            .status,
        );
    }
    (statuses, started.elapsed().as_secs_f64())
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test]
async fn floods_get_429_per_client_and_overall() {
    let app = Upstream::start();
    // Per client: a burst of 5, then 1 per second.
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nrate_per_client = 1\nburst_per_client = 5\nglobal_rate = 100000")
        .start();
    let (statuses, secs) = flood(&sidecar, 20, |_| None).await;
    let accepted = count(&statuses, 204);
    assert!(
        accepted >= 5 && accepted <= 5 + secs.ceil() as usize,
        "{statuses:?} in {secs:.2}s"
    );
    assert_eq!(accepted + count(&statuses, 429), 20, "{statuses:?}");

    // Clients told apart by X-Forwarded-For each get their own burst…
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nrate_per_client = 1\nburst_per_client = 2\nglobal_rate = 100000\nclient_ip_from_forwarded_for = true")
        .start();
    let (statuses, _) = flood(&sidecar, 10, |i| Some(format!("198.51.100.{i}"))).await;
    assert_eq!(
        count(&statuses, 204),
        10,
        "ten clients, two each allowed: {statuses:?}"
    );
    // …the last entry is the client (the first can be forged by it)…
    let (statuses, secs) = flood(&sidecar, 10, |i| Some(format!("10.0.0.{i}, 203.0.113.7"))).await;
    assert!(
        count(&statuses, 204) <= 2 + secs.ceil() as usize,
        "one client behind the LB: {statuses:?}"
    );

    // …and the global cap holds whatever the client.
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nglobal_rate = 1\nclient_ip_from_forwarded_for = true")
        .start();
    let (statuses, secs) = flood(&sidecar, 10, |i| Some(format!("198.51.100.{i}"))).await;
    let accepted = count(&statuses, 204);
    assert!(
        accepted >= 1 && accepted <= 1 + secs.ceil() as usize,
        "{statuses:?} in {secs:.2}s"
    );
}

#[tokio::test]
async fn a_slow_body_gets_408() {
    use std::io::{Read, Write};
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nbody_timeout = \"300ms\"")
        .start();
    let mut stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    stream
        .write_all(b"POST /__cspreport__ HTTP/1.1\r\nHost: h\r\nContent-Type: application/csp-report\r\nContent-Length: 100\r\n\r\n{\"csp")
        .unwrap();
    let started = std::time::Instant::now();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn identical_reports_are_counted_on_one_row() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for _ in 0..3 {
        assert_eq!(
            post(&sidecar, CSP, legacy_csp().to_string()).await.status,
            204
        );
    }
    let mut other = legacy_csp();
    other["csp-report"]["blocked-uri"] = json!("https://other.example/x.js");
    assert_eq!(post(&sidecar, CSP, other.to_string()).await.status, 204);
    logged(&sidecar, 4);
    let rows = stored(&sidecar, 2);
    let mut counts: Vec<i64> = rows.iter().map(|r| r["count"].as_i64().unwrap()).collect();
    counts.sort();
    // Give the writer a moment to settle all four before reading the counts.
    let end = std::time::Instant::now() + common::DEADLINE;
    while counts != [1, 3] {
        assert!(std::time::Instant::now() < end, "counts {counts:?}");
        std::thread::sleep(Duration::from_millis(20));
        counts = stored(&sidecar, 2)
            .iter()
            .map(|r| r["count"].as_i64().unwrap())
            .collect();
        counts.sort();
    }
    assert_eq!(rows.len(), 2);
}

#[tokio::test]
async fn browser_extension_noise_is_dropped() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for blocked in [
        "chrome-extension",
        "moz-extension://abcd/content.js",
        "safari-web-extension://x/y.js",
    ] {
        let report = json!({"csp-report": {"document-uri": "https://a.example/", "violated-directive": "script-src", "blocked-uri": blocked}});
        assert_eq!(post(&sidecar, CSP, report.to_string()).await.status, 204);
    }
    assert_eq!(
        post(&sidecar, CSP, legacy_csp().to_string()).await.status,
        204
    );
    let rows = stored(&sidecar, 1);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["blocked_url"], "https://evil.example/steal.js");
    // Lines keep their order: once the last report's line is out, any line
    // for the noise before it would be too.
    logged(&sidecar, 1);
    let count = sidecar
        .stdout
        .all()
        .iter()
        .filter(|l| l.contains("\"Type\":\"report\""))
        .count();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn forward_passes_accepted_reports_to_the_app() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nforward = true")
        .start();
    assert_eq!(
        post(&sidecar, CSP, legacy_csp().to_string()).await.status,
        204
    );
    app.wait_for_hits(1).await;
    assert_eq!(post(&sidecar, CSP, "not json").await.status, 400);
    // Only the accepted one reached the app.
    get_last(&sidecar).await;
    assert_eq!(app.hits(), 2, "the accepted report, then the final GET");
}

async fn get_last(sidecar: &Sidecar) {
    let reply = common::get(&sidecar.url("/last"), &[]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn odd_payloads_never_get_a_5xx() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let payloads: Vec<(&str, String)> = vec![
        (CSP, json!({"csp-report": {"line-number": -5, "column-number": 1e300, "status-code": "abc", "blocked-uri": null}}).to_string()),
        (CSP, json!({"csp-report": {"violated-directive": "", "document-uri": 42}}).to_string()),
        (CSP, json!({"csp-report": {"document-uri": "https://a.example/\u{0}\u{1b}[31m", "violated-directive": "img-src\n\r"}}).to_string()),
        (REPORTS, json!([{"type": "csp-violation", "age": -1, "body": null}]).to_string()),
        (REPORTS, json!([{"type": "x".repeat(10_000), "body": {}}]).to_string()),
        (REPORTS, json!([{"type": "network-error", "age": "soon", "url": 5, "body": {"status_code": "500"}}]).to_string()),
        (REPORTS, nested),
        (REPORTS, json!({"type": "csp-violation", "body": {"effectiveDirective": ["a"]}}).to_string()),
        ("application/json", "null".to_string()),
        ("application/json", "123456789012345678901234567890".to_string()),
    ];
    for (content_type, body) in payloads {
        let reply = post(&sidecar, content_type, body.clone()).await;
        assert!(reply.status < 500, "{} for {body:.80}", reply.status);
    }
    // Control characters never reach a log line.
    for line in sidecar
        .stdout
        .all()
        .iter()
        .filter(|l| l.contains("\"Type\":\"report\""))
    {
        let json: Value = serde_json::from_str(line).unwrap();
        assert!(!json["Fields"].to_string().contains("\\u001b"), "{line}");
    }
}

#[tokio::test]
async fn prune_deletes_old_reports() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    assert_eq!(
        post(&sidecar, CSP, legacy_csp().to_string()).await.status,
        204
    );
    stored(&sidecar, 1);
    let kept = sidecar.cli(&["reports", "prune", "--older-than", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&kept.stdout).trim(),
        "deleted 0 reports"
    );
    std::thread::sleep(Duration::from_millis(5));
    let pruned = sidecar.cli(&["reports", "prune", "--older-than", "1ms"]);
    assert_eq!(
        String::from_utf8_lossy(&pruned.stdout).trim(),
        "deleted 1 reports"
    );
    let out = sidecar.cli(&["reports", "list", "--json"]);
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn reports_are_stored_before_exit() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url()).start();
    for i in 0..50 {
        let report = json!({"csp-report": {"document-uri": format!("https://a.example/{i}"), "violated-directive": "img-src"}});
        assert_eq!(post(&sidecar, CSP, report.to_string()).await.status, 204);
    }
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(0));
    let out = sidecar.cli(&["reports", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 50);
}

#[tokio::test]
async fn reports_past_retention_are_deleted_automatically_even_when_idle() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[reports]\nretention = \"1s\"")
        .start();
    let report = json!({"csp-report": {"document-uri": "https://a.example/old", "violated-directive": "img-src"}});
    assert_eq!(post(&sidecar, CSP, report.to_string()).await.status, 204);
    stored(&sidecar, 1);
    // Nothing else arrives: the writer must prune on its own.
    let end = std::time::Instant::now() + common::DEADLINE;
    loop {
        let out = sidecar.cli(&["reports", "list", "--json"]);
        if out.stdout.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the report outlived its retention"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
