//! Hooks: events become signed, retried webhooks to a real receiver, through
//! the durable outbox.

mod common;

use std::time::Duration;

use base64::Engine;
use common::receiver::Receiver;
use common::{get, request, Sidecar, SidecarBuilder, Upstream};
use hmac::Mac;
use serde_json::Value;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn hook(name: &str, events: &str, url: &str, extra: &str) -> String {
    format!("[[hooks]]\nname = \"{name}\"\nevents = [{events}]\nurl = \"{url}\"\n{extra}\n")
}

/// A sidecar with these hooks and a fast retry schedule.
fn sidecar(app: &Upstream, hooks: &[String], delivery: &str) -> Sidecar {
    let toml = format!(
        "[heartbeat]\ncache_ttl = \"0s\"\n[[heartbeat.checks]]\nname = \"app\"\nkind = \"upstream\"\npath = \"/health\"\n\n\
         [delivery]\nretry_schedule = [\"100ms\", \"100ms\", \"100ms\"]\n{delivery}\n\n{}",
        hooks.concat()
    );
    SidecarBuilder::new(&app.url()).toml(&toml).start()
}

/// The outbox rows, through the CLI.
fn rows(sidecar: &Sidecar) -> Vec<Value> {
    let out = sidecar.cli(&["hooks", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the row of `hook` has `status`.
fn row_with(sidecar: &Sidecar, hook: &str, status: &str) -> Value {
    let end = std::time::Instant::now() + common::DEADLINE;
    loop {
        if let Some(row) = rows(sidecar)
            .into_iter()
            .find(|r| r["hook"] == hook && r["status"] == status)
        {
            return row;
        }
        assert!(
            std::time::Instant::now() < end,
            "no {status} row for {hook}: {:?}",
            rows(sidecar)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn fail_heartbeat(app: &Upstream, sidecar: &Sidecar) {
    app.set_health(503);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 500);
}

#[tokio::test]
async fn heartbeat_failed_is_delivered_signed_with_its_headers() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "ops",
            "\"heartbeat.failed\", \"heartbeat.passed\"",
            &receiver.url("/ok"),
            &format!("secret = \"{SECRET}\"\nheaders = {{ \"X-Api-Key\" = \"key:with:colons\", \"Authorization\" = \"Bearer a:b\" }}"),
        )],
        "",
    );
    fail_heartbeat(&app, &sidecar).await;
    let got = receiver.wait_for("/ok", 1).remove(0);
    assert_eq!(got.method, "POST");
    assert_eq!(got.headers["x-api-key"], "key:with:colons");
    assert_eq!(got.headers["authorization"], "Bearer a:b");
    assert_eq!(got.headers["content-type"], "application/json");
    let body: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(body["type"], "heartbeat.failed");
    assert_eq!(body["data"]["checks"]["app"]["level"], 40);

    // Verify the signature independently of the sidecar's code.
    let id = got.headers["webhook-id"].to_str().unwrap();
    let timestamp = got.headers["webhook-timestamp"].to_str().unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{}", got.body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(got.headers["webhook-signature"], expected.as_str());
    assert!(id.starts_with("msg_"));

    let row = row_with(&sidecar, "ops", "sent");
    assert_eq!(row["id"], id);
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["last_status"], 200);

    app.set_health(200);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 200);
    let passed: Value = serde_json::from_str(&receiver.wait_for("/ok", 2)[1].body).unwrap();
    assert_eq!(passed["type"], "heartbeat.passed");
    assert_eq!(passed["data"]["recovered"], serde_json::json!(["app"]));
}

#[tokio::test]
async fn template_values_are_json_escaped() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let template = r#"template = '{"text": "{{ event.type }} from {{ event.data.user_agent }} on {{ service }}", "data": {{ event.data }}}'"#;
    let sidecar = sidecar(
        &app,
        &[hook(
            "chat",
            "\"report.received\"",
            &receiver.url("/ok"),
            template,
        )],
        "",
    );
    let hostile = r#"evil "quote" \ backslash }}"#;
    let report = r#"{"csp-report": {"document-uri": "https://a.example/", "violated-directive": "img-src"}}"#;
    let reply = request(
        "POST",
        &sidecar.url("/__cspreport__"),
        &[
            ("content-type", "application/csp-report"),
            ("user-agent", hostile),
        ],
        report,
    )
    .await;
    assert_eq!(reply.status, 204);
    let got = receiver.wait_for("/ok", 1).remove(0);
    let body: Value =
        serde_json::from_str(&got.body).unwrap_or_else(|e| panic!("{e}: {}", got.body));
    assert_eq!(
        body["text"],
        format!("report.received from {hostile} on dockerflow-sidecar")
    );
    assert_eq!(body["data"]["user_agent"], hostile);
    assert_eq!(body["data"]["directive"], "img-src");
}

#[tokio::test]
async fn failures_are_retried_until_the_receiver_accepts() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "flaky",
            "\"heartbeat.failed\"",
            &receiver.url("/fail/2"),
            "",
        )],
        "",
    );
    fail_heartbeat(&app, &sidecar).await;
    let got = receiver.wait_for("/fail/2", 3);
    let ids: Vec<&str> = got
        .iter()
        .map(|r| {
            r.headers
                .get("webhook-id")
                .map_or("", |v| v.to_str().unwrap())
        })
        .collect();
    assert_eq!(got[0].body, got[2].body, "the same delivery each time");
    assert!(ids.iter().all(|id| *id == ids[0]));
    let row = row_with(&sidecar, "flaky", "sent");
    assert_eq!(row["attempts"], 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "polite",
            "\"heartbeat.failed\"",
            &receiver.url("/retry-after"),
            "",
        )],
        "",
    );
    fail_heartbeat(&app, &sidecar).await;
    let got = receiver.wait_for("/retry-after", 2);
    let waited = got[1].at - got[0].at;
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}; Retry-After said 1s"
    );
    row_with(&sidecar, "polite", "sent");
}

#[tokio::test]
async fn gone_stops_retries_and_redirects_are_not_followed() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[
            hook("gone", "\"heartbeat.failed\"", &receiver.url("/gone"), ""),
            hook(
                "moved",
                "\"heartbeat.failed\"",
                &receiver.url("/redirect"),
                "",
            ),
        ],
        "",
    );
    fail_heartbeat(&app, &sidecar).await;
    let gone = row_with(&sidecar, "gone", "error");
    assert_eq!(gone["attempts"], 1);
    assert!(gone["last_error"].as_str().unwrap().contains("gone"));
    let moved = row_with(&sidecar, "moved", "error");
    assert_eq!(moved["last_status"], 302);
    assert_eq!(moved["attempts"], 4, "the first attempt and 3 retries");
    assert_eq!(
        receiver.all().iter().filter(|r| r.path == "/gone").count(),
        1
    );
    assert!(
        receiver.all().iter().all(|r| r.path != "/ok"),
        "the redirect was not followed"
    );
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "slow",
            "\"heartbeat.failed\"",
            &receiver.url("/slow"),
            "",
        )],
        "timeout = \"300ms\"",
    );
    fail_heartbeat(&app, &sidecar).await;
    let row = row_with(&sidecar, "slow", "error");
    assert_eq!(row["attempts"], 4);
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer within 300ms"),
        "{row}"
    );
}

#[tokio::test]
async fn app_5xx_and_proxy_502_are_upstream_error_events() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "errors",
            "\"upstream.error\"",
            &receiver.url("/ok"),
            "",
        )],
        "",
    );
    assert_eq!(
        get(
            &sidecar.url("/status/503?secret=1"),
            &[("x-request-id", "e-1")]
        )
        .await
        .status,
        503
    );
    let got = receiver.wait_for("/ok", 1);
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "upstream.error");
    assert_eq!(body["data"]["status"], 503);
    assert_eq!(body["data"]["path"], "/status/503");
    assert_eq!(body["data"]["request_id"], "e-1");
    assert!(!got[0].body.contains("secret=1"));
}

#[tokio::test]
async fn cli_lists_monitors_replays_and_prunes() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "gone",
            "\"heartbeat.failed\"",
            &receiver.url("/gone"),
            "",
        )],
        "",
    );
    fail_heartbeat(&app, &sidecar).await;
    let row = row_with(&sidecar, "gone", "error");

    let monitor = sidecar.cli(&["hooks", "monitor", "--status", "error", "--limit", "0"]);
    assert_eq!(monitor.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&monitor.stdout).trim(),
        "1 error hook deliveries (limit 0)"
    );
    let monitor = sidecar.cli(&["hooks", "monitor", "--status", "error", "--limit", "1"]);
    assert_eq!(monitor.status.code(), Some(0));
    let monitor = sidecar.cli(&[
        "hooks",
        "monitor",
        "--status",
        "error",
        "--limit",
        "0",
        "--minutes-ago",
        "60",
    ]);
    assert_eq!(
        monitor.status.code(),
        Some(0),
        "the error is younger than an hour"
    );

    // Replay: the CLI delivers the error row again, with the same id.
    let send = sidecar.cli(&["hooks", "send", "--id", row["id"].as_str().unwrap()]);
    assert_eq!(
        send.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&send.stdout)
    );
    let got = receiver.wait_for("/gone", 2);
    assert_eq!(got[1].headers["webhook-id"], got[0].headers["webhook-id"]);
    let replayed = row_with(&sidecar, "gone", "error");
    assert_eq!(replayed["attempts"], 2);

    let prune = sidecar.cli(&["hooks", "prune", "--older-than", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&prune.stdout).trim(),
        "deleted 0 hook deliveries"
    );
    std::thread::sleep(Duration::from_millis(5));
    let prune = sidecar.cli(&["hooks", "prune", "--older-than", "1ms"]);
    assert_eq!(
        String::from_utf8_lossy(&prune.stdout).trim(),
        "deleted 1 hook deliveries"
    );
    assert!(rows(&sidecar).is_empty());
}

#[test]
fn invalid_hooks_fail_check_config_naming_the_hook_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            hook("a", "\"heartbeat.exploded\"", "http://x/", ""),
            "`hooks[0].events` (hook `a`",
        ),
        (
            hook("b", "\"heartbeat.failed\"", "ftp://x/", ""),
            "`hooks[0].url` (hook `b`",
        ),
        (
            hook(
                "c",
                "\"heartbeat.failed\"",
                "http://x/",
                "template = '{\"t\": {{ event.type }}}'",
            ),
            "`hooks[0].template` (hook `c`",
        ),
        (
            hook(
                "d",
                "\"heartbeat.failed\"",
                "http://x/",
                "secret = \"not-base64!\"",
            ),
            "`hooks[0].secret` (hook `d`",
        ),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("h{i}.toml"));
        std::fs::write(&file, toml).unwrap();
        let out = std::process::Command::new(common::binary())
            .args(["check-config", "--config", file.to_str().unwrap()])
            .env_remove("DOCKERFLOW_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key) && err.contains(&file.display().to_string()),
            "{toml}\n→ {err}"
        );
    }
}

/// A reload whose template never finishes rendering is refused once the
/// check's limit (3 s) has passed, and the proxy answers all the while,
/// even on one worker thread: the reload runs off the runtime's threads.
#[tokio::test]
async fn a_reload_whose_template_never_finishes_keeps_the_proxy_answering() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("")
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "1")
        .start();
    let config = sidecar.workdir.join("sidecar.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    // `in` walks a lazy sequence of 10^14 items: one instruction of fuel.
    let stuck = hook(
        "stuck",
        "\"heartbeat.failed\"",
        "http://127.0.0.1:9/",
        "content_type = \"text/plain\"\ntemplate = \"{{ 2 in [1] * 100000000000000 }}\"",
    );
    std::fs::write(&config, format!("{original}\n{stuck}")).unwrap();
    sidecar.signal(libc::SIGHUP);
    let refused = |l: &str| l.contains("configuration not reloaded");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut answered, mut slowest) = (0, std::time::Duration::ZERO);
    while !sidecar.stdout.all().iter().any(|l| refused(l)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal within 60 s"
        );
        let started = std::time::Instant::now();
        assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 200);
        slowest = slowest.max(started.elapsed());
        answered += 1;
    }
    let line = sidecar.stdout.wait_for("the refusal", refused);
    assert!(line.contains("samples within 3 s"), "{line}");
    // Blocking the one worker for the check's 3 s would show here.
    assert!(
        answered > 1 && slowest < std::time::Duration::from_secs(2),
        "{answered} requests during the check, the slowest took {slowest:?}"
    );
}

#[tokio::test]
async fn sighup_applies_new_hooks_without_dropping_a_request() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = sidecar(
        &app,
        &[hook(
            "first",
            "\"heartbeat.failed\"",
            &receiver.url("/first"),
            "",
        )],
        "",
    );
    let config = sidecar.workdir.join("sidecar.toml");
    let original = std::fs::read_to_string(&config).unwrap();

    // A broken file is refused and the running hooks stay.
    std::fs::write(&config, format!("{original}\n[[hooks]]\nname = \"bad\"\n")).unwrap();
    sidecar.signal(libc::SIGHUP);
    sidecar
        .stdout
        .wait_for("the refusal", |l| l.contains("configuration not reloaded"));

    std::fs::write(
        &config,
        format!(
            "{original}\n{}",
            hook(
                "second",
                "\"heartbeat.failed\", \"upstream.error\"",
                &receiver.url("/second"),
                ""
            )
        ),
    )
    .unwrap();
    let traffic = {
        let url = sidecar.url("/");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..50 {
                statuses.push(get(&url, &[]).await.status);
            }
            statuses
        })
    };
    sidecar.signal(libc::SIGHUP);
    let line = sidecar
        .stdout
        .wait_for("the reload", |l| l.contains("configuration reloaded"));
    assert!(line.contains("\"hooks\":2"), "{line}");
    assert!(
        traffic.await.unwrap().iter().all(|s| *s == 200),
        "no request failed during the reload"
    );
    assert_eq!(sidecar.pid(), sidecar.pid());

    fail_heartbeat(&app, &sidecar).await;
    receiver.wait_for("/first", 1);
    receiver.wait_for("/second", 1);
    // The proxy now keeps what upstream.error needs: no hook wanted it before.
    assert_eq!(get(&sidecar.url("/status/500"), &[]).await.status, 500);
    let second = receiver.wait_for("/second", 2);
    assert!(
        second.iter().any(|r| r.body.contains("\"upstream.error\"")),
        "{second:?}"
    );
}

#[tokio::test]
async fn kill_9_during_deliveries_loses_nothing() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let workdir = tempfile::tempdir().unwrap();
    let start = |path: &str| {
        SidecarBuilder::new(&app.url())
            .workdir(workdir.path())
            .toml(&format!(
                "[delivery]\nconcurrency = 4\ntimeout = \"60s\"\n\n{}",
                hook("sink", "\"report.received\"", &receiver.url(path), "")
            ))
            .start()
    };
    let mut sidecar = start("/slow");
    const N: usize = 20;
    for i in 0..N {
        let report = format!(
            r#"{{"csp-report": {{"document-uri": "https://a.example/{i}", "violated-directive": "img-src"}}}}"#
        );
        let reply = common::post_csp_report(&sidecar, report).await;
        assert_eq!(reply.status, 204);
    }
    // Every event is a row (an event is durable once its row is committed,
    // a few milliseconds after it happens), and deliveries are in flight
    // (the receiver holds them): kill -9 now.
    let end = std::time::Instant::now() + common::DEADLINE;
    while rows(&sidecar).len() < N {
        assert!(
            std::time::Instant::now() < end,
            "{} of {N} rows",
            rows(&sidecar).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    receiver.wait_for("/slow", 4);
    sidecar.signal(libc::SIGKILL);
    sidecar.wait_exit();
    // The state file survived the kill intact, every row still there.
    let db = rusqlite::Connection::open(sidecar.workdir.join("dockerflow-sidecar.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let outbox: usize = db
        .query_row("SELECT count(*) FROM hook_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outbox, N, "no outbox row lost");
    drop(db);

    // Restart on the same state file, the hook now pointing at a receiver that answers.
    let sidecar = start("/ok");
    let got = receiver.wait_for("/ok", N);
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "every event delivered at least once");
    let slow_ids: Vec<String> = receiver
        .all()
        .iter()
        .filter(|r| r.path == "/slow")
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(
        slow_ids.iter().all(|id| ids.contains(id)),
        "an interrupted delivery went out again with its id"
    );
    sidecar
        .stdout
        .wait_for("the recovery line", |l| l.contains("go out again"));
}
