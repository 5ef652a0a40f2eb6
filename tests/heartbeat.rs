//! `/__heartbeat__` checks against real services: the machine's PostgreSQL
//! and Redis (DOCKERFLOW_TEST_POSTGRES_URL / DOCKERFLOW_TEST_REDIS_URL;
//! `scripts/test-services.sh` prepares them), a real upstream, real files.

mod common;

use std::time::{Duration, Instant};

use common::{get, SidecarBuilder, Upstream};
use serde_json::{json, Value};

fn postgres_url() -> String {
    std::env::var("DOCKERFLOW_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        "postgres://dockerflow_sidecar:dockerflow_sidecar@127.0.0.1:5432/postgres".into()
    })
}

fn redis_url() -> String {
    std::env::var("DOCKERFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A server that accepts connections and never says a word.
fn silent_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

/// A `[[heartbeat.checks]]` table.
fn check(name: &str, kind: &str, rest: &str) -> String {
    format!("[[heartbeat.checks]]\nname = \"{name}\"\nkind = \"{kind}\"\n{rest}\n")
}

/// A sidecar showing full details, with `extra` heartbeat keys and `checks`.
fn sidecar(app: &Upstream, extra: &str, checks: &[String]) -> common::Sidecar {
    let toml = format!(
        "[heartbeat]\ndetails = \"full\"\n{extra}\n{}",
        checks.concat()
    );
    SidecarBuilder::new(&app.url()).toml(&toml).start()
}

/// The message a check reported under `id`.
fn message(body: &Value, check: &str, id: &str) -> String {
    body["details"][check]["messages"][id]
        .as_str()
        .unwrap_or_else(|| panic!("no {id} for {check} in {body:#}"))
        .to_owned()
}

#[tokio::test]
async fn every_kind_passes_against_real_services() {
    let app = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("last-run");
    std::fs::write(&marker, "x").unwrap();
    let sidecar = sidecar(
        &app,
        "",
        &[
            check("upstream", "upstream", "path = \"/health\""),
            check(
                "web",
                "http",
                &format!("url = \"{}/status/204\"", app.url()),
            ),
            check(
                "port",
                "tcp",
                &format!("url = \"tcp://{}\"", app.addr.unwrap()),
            ),
            check(
                "database",
                "postgres",
                &format!("url = \"{}\"", postgres_url()),
            ),
            check("cache", "redis", &format!("url = \"{}\"", redis_url())),
            check("disk", "disk", "path = \"/\"\nmin_free = \"1 B\""),
            check(
                "job",
                "file",
                &format!("path = \"{}\"\nmax_age = \"1h\"", marker.display()),
            ),
        ],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.json(),
        json!({
            "status": "ok",
            "checks": {"upstream": "ok", "web": "ok", "port": "ok", "database": "ok", "cache": "ok", "disk": "ok", "job": "ok"},
            "details": {}
        })
    );
}

#[tokio::test]
async fn postgres_wrong_password_and_missing_database_say_why() {
    let app = Upstream::start();
    let url = postgres_url();
    let wrong_password = url.replacen(":dockerflow_sidecar@", ":not-the-password@", 1);
    assert_ne!(
        wrong_password, url,
        "DOCKERFLOW_TEST_POSTGRES_URL must carry the password of dockerflow_sidecar"
    );
    let (base, _) = url.rsplit_once('/').unwrap();
    let missing_db = format!("{base}/no_such_database");
    let sidecar = sidecar(
        &app,
        "",
        &[
            check(
                "badpass",
                "postgres",
                &format!("url = \"{wrong_password}\""),
            ),
            check("nodb", "postgres", &format!("url = \"{missing_db}\"")),
        ],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 500);
    let body = reply.json();
    let badpass = message(&body, "badpass", "sidecar.E001");
    assert!(
        badpass.contains("password authentication failed"),
        "{badpass}"
    );
    assert!(
        !badpass.contains("not-the-password"),
        "the password is never shown: {badpass}"
    );
    let nodb = message(&body, "nodb", "sidecar.E001");
    assert!(
        nodb.contains("\"no_such_database\" does not exist"),
        "{nodb}"
    );
}

#[tokio::test]
async fn redis_wrong_password_says_why() {
    let app = Upstream::start();
    let url = redis_url().replacen("redis://", "redis://:wrong-password@", 1);
    let sidecar = sidecar(
        &app,
        "",
        &[check("cache", "redis", &format!("url = \"{url}\""))],
    );
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    let text = body["details"]["cache"]["messages"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.to_ascii_lowercase().contains("auth"), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");
}

#[tokio::test]
async fn closed_ports_are_connection_errors() {
    let app = Upstream::start();
    let closed = common::closed_port();
    let port = closed.port;
    let sidecar = sidecar(
        &app,
        "",
        &[
            check("tcp", "tcp", &format!("url = \"tcp://127.0.0.1:{port}\"")),
            check(
                "pg",
                "postgres",
                &format!("url = \"postgres://x:y@127.0.0.1:{port}/db\""),
            ),
            check(
                "redis",
                "redis",
                &format!("url = \"redis://127.0.0.1:{port}\""),
            ),
            check(
                "web",
                "http",
                &format!("url = \"http://127.0.0.1:{port}/\""),
            ),
        ],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 500);
    let body = reply.json();
    for name in ["tcp", "pg", "redis", "web"] {
        let text = message(&body, name, "sidecar.E001");
        assert!(
            text.to_ascii_lowercase().contains("refused"),
            "{name}: {text}"
        );
        assert_eq!(body["details"][name]["level"], 40);
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_within_the_bound() {
    let app = Upstream::start();
    let silent = silent_server();
    let sidecar = sidecar(
        &app,
        "timeout = \"300ms\"",
        &[
            check(
                "pg",
                "postgres",
                &format!("url = \"postgres://x:y@{silent}/db\""),
            ),
            check("redis", "redis", &format!("url = \"redis://{silent}\"")),
            check(
                "web",
                "http",
                &format!("url = \"http://{silent}/\"\ntimeout = \"500ms\""),
            ),
        ],
    );
    let started = Instant::now();
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    let took = started.elapsed();
    // A margin for a loaded machine that stays below what a regression
    // costs: a silent server never answers, and a check that lost its own
    // timeout would wait the 3 s default.
    assert!(
        took < Duration::from_millis(2900),
        "answered after {took:?}; the largest timeout is 500ms, the default 3s"
    );
    assert_eq!(reply.status, 500);
    let body = reply.json();
    assert_eq!(
        message(&body, "pg", "sidecar.E003"),
        "timed out after 300ms"
    );
    assert_eq!(
        message(&body, "redis", "sidecar.E003"),
        "timed out after 300ms"
    );
    assert_eq!(
        message(&body, "web", "sidecar.E003"),
        "timed out after 500ms"
    );
}

#[tokio::test]
async fn pending_migrations_warn_and_still_pass() {
    let app = Upstream::start();
    let query = "SELECT name FROM (VALUES ('0042_add_index'), ('0043_backfill')) AS pending(name)";
    let sidecar = sidecar(
        &app,
        "",
        &[check(
            "database",
            "postgres",
            &format!(
                "url = \"{}\"\nmigrations_query = \"{query}\"",
                postgres_url()
            ),
        )],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["status"], "warning");
    assert_eq!(body["details"]["database"]["level"], 30);
    assert_eq!(
        message(&body, "database", "sidecar.W001"),
        "2 unapplied migrations found"
    );
}

#[tokio::test]
async fn a_failing_query_is_an_error() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "",
        &[check(
            "database",
            "postgres",
            &format!(
                "url = \"{}\"\nquery = \"SELECT * FROM no_such_table\"",
                postgres_url()
            ),
        )],
    );
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    let text = message(&body, "database", "sidecar.E004");
    assert!(text.contains("no_such_table"), "{text}");
}

#[tokio::test]
async fn levels_decide_the_status_code() {
    let app = Upstream::start();
    let closed = common::closed_port();
    let port = closed.port;
    let failing = |level: &str| {
        check(
            "dep",
            "tcp",
            &format!("url = \"tcp://127.0.0.1:{port}\"\nlevel = \"{level}\""),
        )
    };
    for (level, status, text) in [
        ("warning", 200, "warning"),
        ("error", 503, "error"),
        ("critical", 503, "critical"),
    ] {
        let sidecar = sidecar(&app, "failed_status = 503", &[failing(level)]);
        let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
        assert_eq!(reply.status, status, "{level}");
        let body = reply.json();
        assert_eq!(body["status"], text);
        assert_eq!(body["checks"]["dep"], text);
        assert_eq!(body["details"]["dep"]["status"], text);
    }
}

#[tokio::test]
async fn silenced_ids_are_ignored() {
    let app = Upstream::start();
    let closed = common::closed_port();
    let port = closed.port;
    let sidecar = sidecar(
        &app,
        "silenced = [\"sidecar.E001\"]",
        &[check(
            "dep",
            "tcp",
            &format!("url = \"tcp://127.0.0.1:{port}\""),
        )],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"status": "ok", "checks": {"dep": "ok"}, "details": {}})
    );
}

#[tokio::test]
async fn merges_the_apps_own_dockerflow_heartbeat() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "",
        &[check(
            "app",
            "upstream",
            "path = \"/dockerflow-heartbeat\"\nmerge = true",
        )],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 500);
    let body = reply.json();
    assert_eq!(body["status"], "error");
    assert_eq!(
        body["checks"],
        json!({"app": "ok", "database": "error", "migrations": "warning", "redis": "ok"})
    );
    assert_eq!(
        body["details"]["database"],
        json!({"status": "error", "level": 40, "messages": {"dockerflow.health.E001": "Could not connect to database"}})
    );
    assert_eq!(body["details"]["migrations"]["level"], 30);

    // Without a heartbeat body there is nothing to merge: say so.
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[heartbeat]\ndetails = \"full\"\n{}",
            check("app", "upstream", "path = \"/status/200\"\nmerge = true")
        ))
        .start();
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    assert!(message(&body, "app", "sidecar.E008").contains("without a Dockerflow heartbeat body"));
}

#[tokio::test]
async fn expected_status_decides_what_passes() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "",
        &[
            check(
                "teapot",
                "http",
                &format!(
                    "url = \"{}/status/418\"\nexpected_status = [418]",
                    app.url()
                ),
            ),
            check(
                "range",
                "upstream",
                "path = \"/status/404\"\nexpected_status = [\"200-299\", 404]",
            ),
            check(
                "strict",
                "upstream",
                "path = \"/status/302\"\nexpected_status = [\"200-299\"]",
            ),
        ],
    );
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    assert_eq!(
        body["checks"],
        json!({"teapot": "ok", "range": "ok", "strict": "error"})
    );
    assert!(message(&body, "strict", "sidecar.E002").contains("answered 302"));
}

#[tokio::test]
async fn disk_and_file_checks_fail_with_the_reason() {
    let app = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    let file = std::fs::File::create(&old).unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let sidecar = sidecar(
        &app,
        "",
        &[
            check("disk", "disk", "path = \"/\"\nmin_free = \"100%\""),
            check(
                "missing",
                "file",
                &format!("path = \"{}\"", dir.path().join("nope").display()),
            ),
            check(
                "stale",
                "file",
                &format!("path = \"{}\"\nmax_age = \"1h\"", old.display()),
            ),
        ],
    );
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    assert!(message(&body, "disk", "sidecar.E005").contains("less than 100%"));
    assert!(message(&body, "missing", "sidecar.E006").contains("No such file"));
    let stale = message(&body, "stale", "sidecar.E007");
    assert!(
        stale.contains("2h") && stale.contains("more than 1h"),
        "{stale}"
    );
}

#[tokio::test]
async fn concurrent_polls_share_one_round_of_checks() {
    let app = Upstream::start();
    // A slow round, so every poll arrives while it runs; cache_ttl 0, so only
    // single flight can make them share it.
    let sidecar = sidecar(
        &app,
        "cache_ttl = \"0s\"",
        &[check("app", "upstream", "path = \"/slow/1000\"")],
    );
    let polls: Vec<_> = (0..100)
        .map(|_| {
            let url = sidecar.url("/__heartbeat__");
            tokio::spawn(async move { get(&url, &[]).await.status })
        })
        .collect();
    for poll in polls {
        assert_eq!(poll.await.unwrap(), 200);
    }
    assert_eq!(app.hits(), 1, "100 concurrent polls, one round of checks");

    let sidecar = sidecar_with_cache(&app, "10s");
    let before = app.hits();
    for _ in 0..20 {
        assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 200);
    }
    assert_eq!(
        app.hits() - before,
        1,
        "one round answers every poll within cache_ttl"
    );
}

fn sidecar_with_cache(app: &Upstream, ttl: &str) -> common::Sidecar {
    sidecar(
        app,
        &format!("cache_ttl = \"{ttl}\""),
        &[check("app", "upstream", "path = \"/health\"")],
    )
}

#[tokio::test]
async fn state_changes_are_logged_as_heartbeat_lines() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "cache_ttl = \"0s\"",
        &[check("app", "upstream", "path = \"/health\"")],
    );
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 200);
    app.set_health(503);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 500);
    let failed = sidecar
        .stdout
        .wait_for("the failure line", |l| l.contains("\"Type\":\"heartbeat\""));
    let failed: Value = serde_json::from_str(&failed).unwrap();
    assert_eq!(failed["Severity"], 3);
    assert_eq!(failed["Fields"]["changed"], "app: ok → error");
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 500);
    app.set_health(200);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 200);
    let lines = sidecar
        .stdout
        .wait_for_count("two heartbeat lines", 2, |l| {
            l.contains("\"Type\":\"heartbeat\"")
        });
    let recovered: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(recovered["Severity"], 6);
    assert_eq!(recovered["Fields"]["changed"], "app: error → ok");
    // A poll without a change writes no line.
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 200);
    get(&sidecar.url("/"), &[("x-request-id", "after")]).await;
    sidecar.summary_for("after");
    let count = sidecar
        .stdout
        .all()
        .iter()
        .filter(|l| l.contains("\"Type\":\"heartbeat\""))
        .count();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn url_can_come_from_a_file() {
    let app = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("database-url");
    std::fs::write(&secret, format!("{}\n", postgres_url())).unwrap();
    let sidecar = sidecar(
        &app,
        "",
        &[check(
            "database",
            "postgres",
            &format!("url_file = \"{}\"", secret.display()),
        )],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

/// An HTTPS server with a certificate for `localhost` made on the spot;
/// returns its port and the certificate's PEM.
fn https_server() -> (u16, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let pem = certified.cert.pem();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    common::in_background(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"secure")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, pem)
}

#[tokio::test]
async fn https_check_verifies_the_certificate() {
    let app = Upstream::start();
    let (port, pem) = https_server();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let url = format!("https://localhost:{port}/");
    let sidecar = sidecar(
        &app,
        "",
        &[
            check(
                "trusted",
                "http",
                &format!("url = \"{url}\"\nca_file = \"{}\"", ca.display()),
            ),
            check("untrusted", "http", &format!("url = \"{url}\"")),
        ],
    );
    let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
    assert_eq!(
        body["checks"],
        json!({"trusted": "ok", "untrusted": "error"}),
        "{body:#}"
    );
    let text = message(&body, "untrusted", "sidecar.E001");
    assert!(text.contains("certificate"), "{text}");
}

#[tokio::test]
async fn a_poll_that_gives_up_does_not_cancel_the_round() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "cache_ttl = \"0s\"",
        &[check("app", "upstream", "path = \"/slow/1500\"")],
    );
    let url = sidecar.url("/__heartbeat__");
    let started = Instant::now();
    // This poll gives up long before the round ends.
    let impatient = tokio::time::timeout(Duration::from_millis(300), get(&url, &[])).await;
    assert!(impatient.is_err());
    // A patient poll joins the same round and gets its result.
    let reply = get(&url, &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(2800),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(app.hits(), 1, "one round for both polls");
}

#[tokio::test]
async fn a_timed_out_postgres_check_leaves_no_connection_behind() {
    let app = Upstream::start();
    let marker = format!("heartbeat_probe_{}", std::process::id());
    let query = format!("SELECT pg_sleep(30) AS {marker}");
    let sidecar = sidecar(
        &app,
        "cache_ttl = \"0s\"",
        &[check(
            "db",
            "postgres",
            &format!(
                "url = \"{}\"\nquery = \"{query}\"\ntimeout = \"300ms\"",
                postgres_url()
            ),
        )],
    );
    for _ in 0..3 {
        let body = get(&sidecar.url("/__heartbeat__"), &[]).await.json();
        assert_eq!(
            message(&body, "db", "sidecar.E003"),
            "timed out after 300ms"
        );
    }
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let end = Instant::now() + common::DEADLINE;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
                &[&format!("%{marker}%")],
            )
            .await
            .unwrap();
        let left: i64 = row.get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{left} backends still run the timed-out query"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn silencing_applies_to_merged_checks() {
    let app = Upstream::start();
    let sidecar = sidecar(
        &app,
        "silenced = [\"dockerflow.health.W001\", \"dockerflow.health.E001\"]",
        &[check(
            "app",
            "upstream",
            "path = \"/dockerflow-heartbeat\"\nmerge = true",
        )],
    );
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"status": "ok", "checks": {"app": "ok", "database": "ok", "migrations": "ok", "redis": "ok"}, "details": {}})
    );
}
