//! The Dockerflow routes the sidecar answers itself.

mod common;

use common::{get, request, SidecarBuilder, Upstream};
use serde_json::json;

#[tokio::test]
async fn lbheartbeat_is_200_empty_and_never_touches_the_app() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for path in [
        "/__lbheartbeat__",
        "/__lbheartbeat__/",
        "/__lbheartbeat__?probe=1",
    ] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(reply.body.is_empty());
        assert!(reply.header("x-request-id").is_some());
    }
    let head = request("HEAD", &sidecar.url("/__lbheartbeat__"), &[], "").await;
    assert_eq!(head.status, 200);
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn dockerflow_routes_refuse_other_methods() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for path in ["/__lbheartbeat__", "/__heartbeat__", "/__version__"] {
        let reply = request("POST", &sidecar.url(path), &[], "x").await;
        assert_eq!(reply.status, 405, "{path}");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    }
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn version_serves_the_file_and_reports_missing_and_invalid() {
    let app = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("version.json");
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[version]\nfiles = [\"/nonexistent/version.json\", \"{}\"]",
            file.display()
        ))
        .start();

    let reply = get(&sidecar.url("/__version__"), &[]).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "version.json not found");

    let version = json!({"source": "https://github.com/x/y", "version": "1.2.3", "commit": "abc", "build": "https://ci/1"});
    std::fs::write(&file, version.to_string()).unwrap();
    let reply = get(&sidecar.url("/__version__/"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), version);

    std::fs::write(&file, "{not json").unwrap();
    let reply = get(&sidecar.url("/__version__"), &[]).await;
    assert_eq!(reply.status, 500);
    sidecar.stdout.wait_for("the error line", |l| {
        l.contains("\"Severity\":3") && l.contains("version file is not a JSON object")
    });
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn version_reads_version_json_in_the_working_directory_by_default() {
    let app = Upstream::start();
    let version = json!({"source": "s", "version": "9.9.9", "commit": "c", "build": "b"});
    // The default list is /app/version.json, then ./version.json; the harness
    // runs the sidecar in its own temporary directory.
    let sidecar = SidecarBuilder::new(&app.url())
        .file("version.json", &version.to_string())
        .start();
    let reply = get(&sidecar.url("/__version__"), &[]).await;
    assert_eq!(reply.status, 200);
    if !std::path::Path::new("/app/version.json").exists() {
        assert_eq!(reply.json(), version);
    }
}

#[tokio::test]
async fn heartbeat_shows_only_status_by_default() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"status": "ok"}));
    assert_eq!(app.hits(), 1, "the upstream check asked the app once");
}

#[tokio::test]
async fn heartbeat_full_details_when_the_app_is_up() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[heartbeat]\ndetails = \"full\"")
        .start();
    let reply = get(&sidecar.url("/__heartbeat__?x=1"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"status": "ok", "checks": {"upstream": "ok"}, "details": {}})
    );
}

#[tokio::test]
async fn heartbeat_fails_with_the_configured_status_when_the_app_is_down() {
    let closed = common::closed_port();
    let port = closed.port;
    let sidecar = SidecarBuilder::new(&format!("http://127.0.0.1:{port}"))
        .toml("[heartbeat]\ndetails = \"full\"\nfailed_status = 503")
        .start();
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 503);
    let body = reply.json();
    assert_eq!(body["status"], "error");
    assert_eq!(body["checks"], json!({"upstream": "error"}));
    assert_eq!(body["details"]["upstream"]["status"], "error");
    assert_eq!(body["details"]["upstream"]["level"], 40);
    let message = body["details"]["upstream"]["messages"]["sidecar.E001"]
        .as_str()
        .unwrap();
    assert!(message.contains("could not reach"), "{message}");

    let head = request("HEAD", &sidecar.url("/__heartbeat__"), &[], "").await;
    assert_eq!(head.status, 503);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn heartbeat_fails_when_the_app_answers_an_error_on_the_check_path() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml("[heartbeat]\ndetails = \"full\"\n[[heartbeat.checks]]\nname = \"upstream\"\nkind = \"upstream\"\npath = \"/status/503\"")
        .start();
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert_eq!(reply.status, 500);
    let message = reply.json()["details"]["upstream"]["messages"]["sidecar.E002"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("answered 503"), "{message}");
}

#[tokio::test]
async fn heartbeat_check_times_out_within_its_bound() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(
            "[heartbeat]\ndetails = \"full\"\ntimeout = \"200ms\"\n[[heartbeat.checks]]\nname = \"upstream\"\nkind = \"upstream\"\npath = \"/slow/5000\"",
        )
        .start();
    let started = std::time::Instant::now();
    let reply = get(&sidecar.url("/__heartbeat__"), &[]).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "bounded by the check timeout"
    );
    assert_eq!(reply.status, 500);
    let message = reply.json()["details"]["upstream"]["messages"]["sidecar.E003"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("200ms"), "{message}");
}

#[tokio::test]
async fn lookalike_paths_go_to_the_app() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for path in [
        "/__heartbeat__x",
        "/%5F%5Fheartbeat%5F%5F",
        "//__heartbeat__",
        "/app/__version__",
    ] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["uri"], path);
    }
    assert_eq!(app.hits(), 4);
}
