//! Prometheus metrics and the admin listener: exact values after known
//! traffic, `promtool check metrics` on the output, the admin routes, the
//! bearer token, readiness and drain.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::receiver::Receiver;
use common::smtp::SmtpServer;
use common::{get, request, Sidecar, SidecarBuilder, Upstream};

/// The scrape: its text, and `name{labels}` → value.
async fn scrape_async(sidecar: &Sidecar) -> (String, HashMap<String, f64>) {
    let reply = get(&sidecar.admin_url("/metrics"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let values = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    (text, values)
}

/// Scrapes until `key` has `value` (counters updated off the request path:
/// the report writer, hook deliveries, mail).
async fn wait_for_value(sidecar: &Sidecar, key: &str, value: f64) -> HashMap<String, f64> {
    let end = Instant::now() + common::DEADLINE;
    loop {
        let (text, values) = scrape_async(sidecar).await;
        if values.get(key) == Some(&value) {
            return values;
        }
        assert!(Instant::now() < end, "{key} never became {value}:\n{text}");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn requests(route: &str, method: &str, code: &str) -> String {
    format!("dockerflow_sidecar_requests_total{{code=\"{code}\",method=\"{method}\",route=\"{route}\"}}")
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly_and_pass_promtool() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let smtp = SmtpServer::start(&[]);
    let sidecar = SidecarBuilder::new(&app.url())
        // Pooled connections stay while the test waits for hooks and mail.
        .env("DOCKERFLOW_UPSTREAM__POOL_IDLE_TIMEOUT", "1h")
        .toml(&format!(
            "[heartbeat]\ncache_ttl = \"0s\"\n[[heartbeat.checks]]\nname = \"app\"\nkind = \"upstream\"\npath = \"/health\"\n\n\
             [notify.email]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nadmins = [\"ops@example.com\"]\n\n\
             [[hooks]]\nname = \"sink\"\nevents = [\"report.received\"]\nurl = \"{}\"\n",
            smtp.port,
            receiver.url("/ok")
        ))
        .start();

    let mut sent_bytes = 0usize;
    let mut received_bytes = 0usize;
    for i in 0..3 {
        let reply = get(&sidecar.url(&format!("/page/{i}")), &[]).await;
        assert_eq!(reply.status, 200);
        received_bytes += reply.body.len();
    }
    let upload = vec![b'u'; 1000];
    let reply = request("POST", &sidecar.url("/count"), &[], upload.clone()).await;
    assert_eq!(reply.json()["bytes"], 1000);
    sent_bytes += upload.len();
    received_bytes += reply.body.len();
    for _ in 0..2 {
        let reply = get(&sidecar.url("/status/503"), &[]).await;
        assert_eq!(reply.status, 503);
        received_bytes += reply.body.len();
    }
    for path in ["/__lbheartbeat__", "/__heartbeat__"] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert_eq!(reply.status, 200);
        received_bytes += reply.body.len();
    }
    let report = r#"{"csp-report": {"document-uri": "https://a.example/", "violated-directive": "img-src", "blocked-uri": "https://x.example/i.png"}}"#;
    let reply = common::post_csp_report(&sidecar, report).await;
    assert_eq!(reply.status, 204);
    sent_bytes += report.len();
    let reply = request(
        "POST",
        &sidecar.url("/__cspreport__"),
        &[("content-type", "text/plain")],
        "x",
    )
    .await;
    assert_eq!(reply.status, 415);
    received_bytes += reply.body.len();
    // Every summary line is out, so every request was counted.
    sidecar
        .stdout
        .wait_for_count("10 summaries", 10, |l| l.contains("request.summary"));

    receiver.wait_for("/ok", 1);
    smtp.wait_for("GET /status/503 → 503", 1);
    wait_for_value(
        &sidecar,
        "dockerflow_sidecar_hook_deliveries_total{hook=\"sink\",outcome=\"sent\"}",
        1.0,
    )
    .await;
    wait_for_value(
        &sidecar,
        "dockerflow_sidecar_reports_total{outcome=\"stored\",type=\"csp-violation\"}",
        1.0,
    )
    .await;
    wait_for_value(
        &sidecar,
        "dockerflow_sidecar_mail_total{outcome=\"sent\"}",
        1.0,
    )
    .await;
    // The delivery is counted before its row is written back as sent.
    wait_for_value(
        &sidecar,
        "dockerflow_sidecar_hook_outbox_rows{status=\"sent\"}",
        1.0,
    )
    .await;
    let (text, m) = scrape_async(&sidecar).await;
    let expect = |key: &str, value: f64| {
        assert_eq!(m.get(key), Some(&value), "{key}:\n{text}");
    };
    expect(&requests("proxy", "GET", "2xx"), 3.0);
    expect(&requests("proxy", "POST", "2xx"), 1.0);
    expect(&requests("proxy", "GET", "5xx"), 2.0);
    expect(&requests("dockerflow", "GET", "2xx"), 2.0);
    expect(&requests("report", "POST", "2xx"), 1.0);
    expect(&requests("report", "POST", "4xx"), 1.0);
    expect(&requests("proxy", "DELETE", "2xx"), 0.0);
    expect(
        "dockerflow_sidecar_request_duration_seconds_count{route=\"proxy\"}",
        6.0,
    );
    expect(
        "dockerflow_sidecar_request_duration_seconds_count{route=\"dockerflow\"}",
        2.0,
    );
    expect(
        "dockerflow_sidecar_request_body_bytes_total",
        sent_bytes as f64,
    );
    expect(
        "dockerflow_sidecar_response_body_bytes_total",
        received_bytes as f64,
    );
    expect(
        "dockerflow_sidecar_report_requests_rejected_total{reason=\"content_type\"}",
        1.0,
    );
    expect(
        "dockerflow_sidecar_report_requests_rejected_total{reason=\"rate_limited\"}",
        0.0,
    );
    expect("dockerflow_sidecar_hook_outbox_rows{status=\"sent\"}", 1.0);
    expect(
        "dockerflow_sidecar_hook_outbox_rows{status=\"waiting\"}",
        0.0,
    );
    expect("dockerflow_sidecar_hook_outbox_oldest_waiting_seconds", 0.0);
    expect("dockerflow_sidecar_mail_total{outcome=\"suppressed\"}", 1.0);
    expect("dockerflow_sidecar_mail_total{outcome=\"failed\"}", 0.0);
    expect(
        "dockerflow_sidecar_heartbeat_check_level{check=\"app\"}",
        0.0,
    );
    expect("dockerflow_sidecar_heartbeat_level", 0.0);
    expect("dockerflow_sidecar_upstream_connect_errors_total", 0.0);
    expect("dockerflow_sidecar_log_lines_dropped_total", 0.0);
    expect("dockerflow_sidecar_upstream_retries_total", 0.0);
    expect("dockerflow_sidecar_open_tunnels", 0.0);
    expect(
        &format!(
            "dockerflow_sidecar_build_info{{commit=\"unknown\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    assert!(m["dockerflow_sidecar_heartbeat_check_duration_seconds{check=\"app\"}"] > 0.0);
    assert!(
        m["dockerflow_sidecar_upstream_connections"] >= 1.0,
        "{text}"
    );
    assert!(m["process_resident_memory_bytes"] > 1e6, "{text}");
    assert!(m["process_open_fds"] > 0.0, "{text}");

    // promtool (Debian's prometheus package) agrees the output is valid and
    // named by the conventions.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test-services.sh installs Debian's prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn upstream_failures_and_levels_are_counted() {
    let down = common::closed_port();
    let sidecar = SidecarBuilder::new(&format!("http://127.0.0.1:{}", down.port))
        .toml("[heartbeat]\ncache_ttl = \"0s\"\n")
        .start();
    for _ in 0..2 {
        assert_eq!(get(&sidecar.url("/"), &[]).await.status, 502);
    }
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 500);
    let (text, m) = scrape_async(&sidecar).await;
    assert_eq!(
        m["dockerflow_sidecar_upstream_connect_errors_total"], 2.0,
        "{text}"
    );
    assert_eq!(m["dockerflow_sidecar_heartbeat_level"], 40.0, "{text}");
    assert_eq!(
        m["dockerflow_sidecar_heartbeat_check_level{check=\"upstream\"}"], 40.0,
        "{text}"
    );
    drop(sidecar);

    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_UPSTREAM__RESPONSE_HEADER_TIMEOUT", "100ms")
        .start();
    assert_eq!(get(&sidecar.url("/slow/2000"), &[]).await.status, 504);
    let (text, m) = scrape_async(&sidecar).await;
    assert_eq!(
        m["dockerflow_sidecar_upstream_timeouts_total"], 1.0,
        "{text}"
    );
    assert_eq!(m[&requests("proxy", "GET", "5xx")], 1.0, "{text}");
}

#[tokio::test]
async fn admin_routes_answer_behind_the_token() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(
            "[heartbeat]\ncache_ttl = \"0s\"\n[[heartbeat.checks]]\nname = \"app\"\nkind = \"upstream\"\npath = \"/health\"\n\n\
             [admin]\ntoken = \"s3cret-token\"\n",
        )
        .start();
    let auth = [("authorization", "Bearer s3cret-token")];
    // The kubelet's readiness probe cannot read a secret: /ready needs none.
    assert_eq!(get(&sidecar.admin_url("/ready"), &[]).await.status, 200);
    for path in ["/metrics", "/__heartbeat__"] {
        let reply = get(&sidecar.admin_url(path), &[]).await;
        assert_eq!(reply.status, 401, "{path}");
        assert!(reply
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        let wrong = get(
            &sidecar.admin_url(path),
            &[("authorization", "Bearer nope")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{path}");
        assert_eq!(
            get(&sidecar.admin_url(path), &auth).await.status,
            200,
            "{path}"
        );
    }
    // The admin heartbeat shows details the public route (details =
    // "status") does not.
    let public = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    assert!(public.get("checks").is_none(), "{public}");
    let full = get(&sidecar.admin_url("/__heartbeat__"), &auth)
        .await
        .json();
    assert_eq!(full["checks"]["app"], "ok", "{full}");
    // Admin routes are never proxied, and the public listener has none.
    let before = app.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        get(&sidecar.admin_url("/anything"), &auth).await.status,
        404
    );
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), before);
    assert_eq!(get(&sidecar.admin_url("/drain"), &auth).await.status, 405);
    let proxied = get(&sidecar.url("/metrics"), &[]).await;
    assert_eq!(proxied.json()["uri"], "/metrics", "the app's own /metrics");

    // Ready follows the app's check.
    app.set_health(503);
    let reply = get(&sidecar.admin_url("/ready"), &auth).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["checks"][0], "app");
    app.set_health(200);
    assert_eq!(get(&sidecar.admin_url("/ready"), &auth).await.status, 200);
}

/// This machine's address on a non-loopback interface (what a client in
/// another pod would connect from).
fn non_loopback_ip() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks a route.
    socket
        .connect("10.255.255.255:1")
        .expect("a route off the loopback interface");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "{ip}");
    ip
}

#[tokio::test]
async fn without_a_token_drain_and_details_answer_only_loopback() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_ADMIN__LISTEN", "0.0.0.0:0")
        .start();
    let port = sidecar.admin.unwrap().port();
    let remote = format!("http://{}:{port}", non_loopback_ip());
    assert_eq!(get(&format!("{remote}/metrics"), &[]).await.status, 200);
    assert_eq!(get(&format!("{remote}/ready"), &[]).await.status, 200);
    assert_eq!(
        get(&format!("{remote}/__heartbeat__"), &[]).await.status,
        403
    );
    assert_eq!(
        request("POST", &format!("{remote}/drain"), &[], "")
            .await
            .status,
        403
    );
    assert_eq!(
        get(&sidecar.url("/__lbheartbeat__"), &[]).await.status,
        200,
        "not draining"
    );
    let local = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get(&format!("{local}/__heartbeat__"), &[]).await.status,
        200
    );
}

#[tokio::test]
async fn the_drain_command_is_a_prestop_hook() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .file("admin-token", "t0ken-from-a-secret\n")
        .toml("[admin]\ntoken_file = \"admin-token\"\n")
        .start();
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 200);
    let out = sidecar.cli(&["drain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "draining");
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 503);
    assert_eq!(get(&sidecar.url("/proxied"), &[]).await.status, 200);
    drop(sidecar);

    // Nobody listening: it says so and fails.
    let down = common::closed_port();
    let out = std::process::Command::new(common::binary())
        .arg("drain")
        .env(
            "DOCKERFLOW_ADMIN__LISTEN",
            format!("127.0.0.1:{}", down.port),
        )
        .env_remove("DOCKERFLOW_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin listener"));
}

#[tokio::test]
async fn post_drain_fails_health_and_readiness_but_keeps_serving() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        .shutdown("60s", "5s")
        .start();
    assert_eq!(get(&sidecar.admin_url("/ready"), &[]).await.status, 200);
    let reply = request("POST", &sidecar.admin_url("/drain"), &[], "").await;
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json()["status"], "draining");
    sidecar
        .stdout
        .wait_for("the drain line", |l| l.contains("POST /drain"));
    assert_eq!(get(&sidecar.admin_url("/ready"), &[]).await.status, 503);
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 503);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 503);
    assert_eq!(get(&sidecar.url("/served"), &[]).await.status, 200);
    // Again is harmless.
    assert_eq!(
        request("POST", &sidecar.admin_url("/drain"), &[], "")
            .await
            .status,
        202
    );
    // SIGTERM waits only what is left of the drain the POST started (less
    // than the configured minute); a second signal ends it here.
    sidecar.signal(libc::SIGTERM);
    let line = sidecar.stdout.wait_for("the signal's drain line", |l| {
        l.contains("\"msg\":\"draining: health")
    });
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    let left = humantime::parse_duration(json["Fields"]["drain"].as_str().unwrap()).unwrap();
    assert!(left < std::time::Duration::from_secs(60), "{left:?}");
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(1));
}
