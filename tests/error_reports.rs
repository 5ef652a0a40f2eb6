//! Error reports: the app's 5xx and the proxy's 502/504 as `upstream.error`,
//! 404s followed from a page as `broken_link`, delivered by hooks to a real
//! receiver and by mail to a real SMTP server (aiosmtpd), scrubbed.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::smtp::SmtpServer;
use common::{get, Sidecar, SidecarBuilder, Upstream};
use serde_json::Value;

const MASK: &str = "********************";

fn hook(name: &str, events: &str, url: &str) -> String {
    format!("[[hooks]]\nname = \"{name}\"\nevents = [{events}]\nurl = \"{url}\"\n")
}

/// `[notify.email]` for a plain-text server on `port`.
fn email(port: u16, extra: &str) -> String {
    format!(
        "[notify.email]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
         from = \"Sidecar <sidecar@example.com>\"\n\
         admins = [\"Ops <ops@example.com>\", \"dev@example.com\"]\n\
         managers = [\"web@example.com\"]\nsubject_prefix = \"[app] \"\n{extra}\n"
    )
}

/// The events the receiver got on `/ok`, as JSON.
fn events(receiver: &Receiver, n: usize) -> Vec<Value> {
    receiver
        .wait_for("/ok", n)
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect()
}

/// An upstream that reads the start of each request and then resets the
/// connection (closing with unread data makes the kernel send RST).
fn resetting_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut first = [0u8; 1];
            let _ = stream.read(&mut first);
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn app_errors_are_events_with_scrubbed_request_details_and_body() {
    let app = Upstream::start();
    let receiver = Receiver::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[errors]\nresponse_body_bytes = 66\nserver_error_statuses = [\"500-599\", 429]\n{}",
            hook("errors", "\"upstream.error\"", &receiver.url("/ok"))
        ))
        .start();
    let reply = get(
        &sidecar.url("/echo-status/500?q=shoes&api_key=K3Y-0001"),
        &[
            ("x-request-id", "err-1"),
            ("authorization", "Bearer T0KEN-0001"),
            ("cookie", "sessionid=C00KIE-0001; theme=dk"),
            ("user-agent", "test-agent/1.0"),
        ],
    )
    .await;
    assert_eq!(reply.status, 500);
    // The app did get the secrets (so their absence below means something).
    let page = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(
        page.contains("T0KEN-0001") && page.contains("K3Y-0001"),
        "{page}"
    );

    let event = &events(&receiver, 1)[0];
    assert_eq!(event["type"], "upstream.error");
    let data = &event["data"];
    assert_eq!(data["method"], "GET");
    assert_eq!(data["path"], "/echo-status/500");
    assert_eq!(data["query"], format!("q=shoes&api_key={MASK}"));
    assert_eq!(data["status"], 500);
    assert_eq!(data["request_id"], "err-1");
    assert_eq!(data["client"], "127.0.0.1");
    assert_eq!(data["host"], sidecar.addr.to_string());
    assert_eq!(data["user_agent"], "test-agent/1.0");
    assert_eq!(data["cause"], Value::Null);
    assert!(data["duration_ms"].as_u64().is_some(), "{data}");
    assert_eq!(data["headers"]["authorization"], MASK);
    assert_eq!(data["headers"]["cookie"], MASK);
    assert_eq!(data["headers"]["user-agent"], "test-agent/1.0");
    // At most the first 66 bytes of the page; the cut falls inside a secret,
    // so the preview ends before it.
    let body = data["body"].as_str().unwrap();
    let start = page.find("Bearer T0KEN-0001").unwrap();
    assert!(
        start < 66 && 66 < start + 17,
        "the cut is not inside the secret: {page}"
    );
    assert_eq!(body, &page[..start]);
    let text = event.to_string();
    for secret in ["K3Y-0001", "T0KEN-0001", "C00KIE-0001"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }

    // Configured statuses: 429 counts, 404 does not. Deliveries run
    // concurrently, so their order is not the requests'; the outbox is
    // written in event order, so once the 503 is delivered a row for the
    // 404 would be there.
    assert_eq!(get(&sidecar.url("/status/404"), &[]).await.status, 404);
    assert_eq!(get(&sidecar.url("/status/429"), &[]).await.status, 429);
    assert_eq!(get(&sidecar.url("/status/503"), &[]).await.status, 503);
    let mut statuses: Vec<u64> = events(&receiver, 3)
        .iter()
        .map(|e| e["data"]["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [429, 500, 503]);
    let out = sidecar.cli(&["hooks", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[tokio::test]
async fn proxy_502_and_504_are_events_with_their_cause() {
    let receiver = Receiver::start();
    let hooks = hook("errors", "\"upstream.error\"", &receiver.url("/ok"));

    // An app that is down.
    let down = common::closed_port();
    let sidecar = SidecarBuilder::new(&format!("http://127.0.0.1:{}", down.port))
        .toml(&hooks)
        .start();
    assert_eq!(
        get(&sidecar.url("/down?token=T0K-2"), &[]).await.status,
        502
    );
    let event = &events(&receiver, 1)[0];
    assert_eq!(event["data"]["status"], 502);
    assert_eq!(event["data"]["cause"], "upstream unreachable");
    assert_eq!(event["data"]["query"], format!("token={MASK}"));
    assert_eq!(event["data"]["body"], Value::Null);
    drop(sidecar);

    // An app that resets the connection.
    let sidecar = SidecarBuilder::new(&resetting_upstream())
        .toml(&hooks)
        .start();
    assert_eq!(get(&sidecar.url("/reset"), &[]).await.status, 502);
    let event = &events(&receiver, 2)[1];
    assert_eq!(event["data"]["path"], "/reset");
    assert_eq!(event["data"]["status"], 502);
    assert_eq!(event["data"]["cause"], "upstream failed");
    drop(sidecar);

    // An app too slow to answer.
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&hooks)
        .env("DOCKERFLOW_UPSTREAM__RESPONSE_HEADER_TIMEOUT", "100ms")
        .start();
    assert_eq!(get(&sidecar.url("/slow/2000"), &[]).await.status, 504);
    let event = &events(&receiver, 3)[2];
    assert_eq!(event["data"]["status"], 504);
    assert_eq!(event["data"]["cause"], "upstream timed out");
    assert!(event["data"]["duration_ms"].as_u64().unwrap() >= 100);
}

#[tokio::test]
async fn server_errors_are_mailed_to_admins() {
    let app = Upstream::start();
    let smtp = SmtpServer::start(&[]);
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[errors]\nresponse_body_bytes = 200\ninternal_ips = [\"10.0.0.0/8\"]\n{}",
            email(smtp.port, "")
        ))
        .start();
    get(
        &sidecar.url("/echo-status/500?q=shoes&password=PW-0003"),
        &[
            ("x-request-id", "mail-1"),
            ("authorization", "Basic QWxhZGRpbjpPcGVuU2VzYW1l"),
            ("cookie", "sessionid=C00KIE-0003"),
            ("user-agent", "test-agent/1.0"),
        ],
    )
    .await;
    let mail = &smtp.wait_for("ERROR", 1)[0];
    assert_eq!(
        mail["subject"],
        "[app] ERROR (EXTERNAL IP): GET /echo-status/500 → 500"
    );
    assert_eq!(mail["from"], "Sidecar <sidecar@example.com>");
    assert_eq!(mail["mail_from"], "sidecar@example.com");
    assert_eq!(
        mail["rcpt_tos"],
        serde_json::json!(["ops@example.com", "dev@example.com"])
    );
    assert_eq!(mail["content_type"], "text/plain");
    let body = mail["body"].as_str().unwrap();
    let host = sidecar.addr.to_string();
    for expected in [
        format!("GET {host}/echo-status/500?q=shoes&password={MASK} → 500 Internal Server Error"),
        "The app answered with this status.".to_owned(),
        "Request id: mail-1".to_owned(),
        "Client:     127.0.0.1 (EXTERNAL)".to_owned(),
        "User agent: test-agent/1.0".to_owned(),
        format!("  authorization: {MASK}"),
        format!("  cookie: {MASK}"),
        "  user-agent: test-agent/1.0".to_owned(),
        "Response body (first".to_owned(),
    ] {
        assert!(body.contains(&expected), "{expected:?} not in:\n{body}");
    }
    let raw = mail["raw"].as_str().unwrap();
    for secret in ["PW-0003", "QWxhZGRpbjpPcGVuU2VzYW1l", "C00KIE-0003"] {
        assert!(
            !raw.contains(secret) && !body.contains(secret),
            "{secret} in:\n{raw}"
        );
    }
    // A proxy failure says so.
    let down = common::closed_port();
    let sidecar = SidecarBuilder::new(&format!("http://127.0.0.1:{}", down.port))
        .toml(&email(smtp.port, ""))
        .start();
    assert_eq!(get(&sidecar.url("/api/orders"), &[]).await.status, 502);
    let mail = &smtp.wait_for("GET /api/orders → 502", 1)[0];
    assert!(
        mail["body"]
            .as_str()
            .unwrap()
            .contains("The sidecar answered itself: upstream unreachable"),
        "{mail}"
    );
}

#[tokio::test]
async fn mail_is_rate_limited_per_kind_status_and_path() {
    let app = Upstream::start();
    let smtp = SmtpServer::start(&[]);
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&email(smtp.port, "rate_limit_window = \"1s\""))
        .start();
    get(&sidecar.url("/status/503"), &[]).await;
    smtp.wait_for("GET /status/503 → 503", 1);
    let mut sent = 1;
    // Within the window: not mailed...
    for _ in 0..3 {
        get(&sidecar.url("/status/503"), &[]).await;
        sent += 1;
    }
    // ...but another status or path is another message.
    get(&sidecar.url("/status/502"), &[]).await;
    smtp.wait_for("GET /status/502 → 502", 1);
    assert_eq!(smtp.wait_for("GET /status/503 → 503", 1).len(), 1);
    // Once the window is over, the next one says how many were held back.
    let end = Instant::now() + common::DEADLINE;
    let second = loop {
        get(&sidecar.url("/status/503"), &[]).await;
        sent += 1;
        let mails: Vec<Value> = smtp
            .messages()
            .into_iter()
            .filter(|m| {
                m["subject"]
                    .as_str()
                    .unwrap()
                    .ends_with("/status/503 → 503")
            })
            .collect();
        if mails.len() == 2 {
            break mails[1].clone();
        }
        assert!(Instant::now() < end, "no second mail");
        // Wait for that mail (not a sleep: it returns as soon as it arrives).
        smtp.wait_within("/status/503 → 503", 2, Duration::from_millis(200));
    };
    let body = second["body"].as_str().unwrap();
    let count: u64 = body
        .lines()
        .find(|l| l.contains("similar message"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{body}"));
    // Every request between the two mails was suppressed; the last one sent
    // may have crossed paths with the mail (then it is in the next window).
    assert!(
        count == sent - 2 || count == sent - 3,
        "{count} suppressed of {sent} sent:\n{body}"
    );
    assert!(count >= 3, "{body}");
    assert!(body.contains("at most one per 1s"), "{body}");
}

#[tokio::test]
async fn broken_links_are_mailed_to_managers_by_django_rules() {
    let app = Upstream::start();
    let smtp = SmtpServer::start(&[]);
    let receiver = Receiver::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "{}\n{}",
            email(smtp.port, ""),
            hook("links", "\"broken_link\"", &receiver.url("/ok"))
        ))
        .start();
    let host = sidecar.addr.to_string();
    let site = format!("http://{host}");
    let ua = ("user-agent", "Mozilla/5.0 Firefox/128.0");
    // Ignorable, each on its own path so no rate limit hides a mistake.
    let ignored: [(&str, Vec<(&str, String)>); 4] = [
        ("/missing/no-referer", vec![]),
        (
            "/missing/search",
            vec![("referer", "https://www.google.com/search?q=x".into())],
        ),
        (
            "/missing/self",
            vec![("referer", format!("{site}/missing/self"))],
        ),
        (
            "/missing/bot",
            vec![
                ("referer", format!("{site}/")),
                (
                    "user-agent",
                    "Googlebot/2.1 (+http://www.google.com/bot.html)".into(),
                ),
            ],
        ),
    ];
    for (path, headers) in &ignored {
        let mut headers: Vec<(&str, &str)> =
            headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if !headers.iter().any(|(k, _)| *k == "user-agent") {
            headers.push(ua);
        }
        assert_eq!(get(&sidecar.url(path), &headers).await.status, 404);
    }
    // Reported: an internal link (with a secret in its query) and an external one.
    let internal_referer = format!("{site}/list?page=2&token=T0K-0005");
    get(
        &sidecar.url("/missing/internal?x=1"),
        &[("referer", &internal_referer), ua, ("x-request-id", "bl-1")],
    )
    .await;
    get(
        &sidecar.url("/missing/external"),
        &[("referer", "https://blog.example/post"), ua],
    )
    .await;
    let mail = &smtp.wait_for(&format!("Broken INTERNAL link on {host}"), 1)[0];
    assert_eq!(
        mail["subject"],
        format!("[app] Broken INTERNAL link on {host}")
    );
    assert_eq!(mail["rcpt_tos"], serde_json::json!(["web@example.com"]));
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.starts_with(&format!(
            "Referrer: {site}/list?page=2&token={MASK}\nRequested URL: /missing/internal?x=1\n\
             User agent: Mozilla/5.0 Firefox/128.0\nIP address: 127.0.0.1\nRequest id: bl-1\n"
        )),
        "{body}"
    );
    let external = &smtp.wait_for(&format!("Broken link on {host}"), 1)[0];
    assert!(external["body"]
        .as_str()
        .unwrap()
        .contains("Requested URL: /missing/external"));
    // Mail goes out in order: the ignored ones, had they been sent, would be here.
    assert_eq!(smtp.messages().len(), 2, "{:#?}", smtp.messages());

    // Deliveries run concurrently: found by path, not by order. The
    // outbox holds exactly the two (rows are written in event order).
    let hooked = events(&receiver, 2);
    let by_path = |path: &str| {
        hooked
            .iter()
            .find(|e| e["data"]["path"] == path)
            .unwrap_or_else(|| panic!("{path}: {hooked:#?}"))["data"]
            .clone()
    };
    let internal = by_path("/missing/internal");
    assert_eq!(internal["query"], "x=1");
    assert_eq!(internal["internal"], true);
    assert_eq!(
        internal["referer"],
        format!("{site}/list?page=2&token={MASK}")
    );
    assert_eq!(internal["request_id"], "bl-1");
    assert_eq!(by_path("/missing/external")["internal"], false);
    assert!(hooked.iter().all(|e| e["type"] == "broken_link"));
    let out = sidecar.cli(&["hooks", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[tokio::test]
async fn an_smtp_outage_never_reaches_a_request() {
    let app = Upstream::start();
    // A server that is down: every delivery fails, is logged and counted.
    let down = common::closed_port();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&email(down.port, ""))
        .start();
    for i in 0..3 {
        let path = format!("/status/500/down-{i}");
        assert_eq!(get(&sidecar.url(&path), &[]).await.status, 500);
    }
    let line = sidecar.stdout.wait_for("the third failure", |l| {
        l.contains("could not send an error mail") && l.contains("\"failed\":3")
    });
    assert!(line.contains("\"Severity\":3"), "{line}");
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 200);
    drop(sidecar);

    // A server that accepts and never speaks, with an hour to answer: were
    // mail on the request path, the first request would hang past the
    // harness deadline. 100 distinct errors fill the 64-message queue; the
    // rest are dropped and counted, and every request is answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&email(
            silent.local_addr().unwrap().port(),
            "timeout = \"1h\"\nmax_per_window = 1000",
        ))
        .start();
    for i in 0..100 {
        let path = format!("/status/500/silent-{i}");
        assert_eq!(get(&sidecar.url(&path), &[]).await.status, 500);
    }
    sidecar.stdout.wait_for("the queue overflow", |l| {
        l.contains("the mail queue is full")
    });
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 200);
}

/// A certificate for `localhost` made on the spot, written as PEM files.
fn certificate(dir: &std::path::Path) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

#[tokio::test]
async fn mail_goes_over_starttls_with_auth_and_over_tls() {
    let app = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let password = dir.path().join("smtp-password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();
    let cases = [
        (
            "starttls",
            vec!["--starttls", &cert, &key, "--auth", "mailer:s3cret-pw"],
        ),
        ("tls", vec!["--tls", &cert, &key]),
    ];
    for (mode, args) in cases {
        let smtp = SmtpServer::start(&args);
        let auth = if mode == "starttls" {
            format!(
                "username = \"mailer\"\npassword_file = \"{}\"\n",
                password.display()
            )
        } else {
            String::new()
        };
        let settings = format!(
            "[notify.email]\nhost = \"localhost\"\nport = {}\ntls = \"{mode}\"\nca_file = \"{cert}\"\n{auth}\
             admins = [\"ops@example.com\"]\n",
            smtp.port
        );
        let sidecar = SidecarBuilder::new(&app.url()).toml(&settings).start();
        get(&sidecar.url(&format!("/status/500?mode={mode}")), &[]).await;
        let mail = &smtp.wait_for("GET /status/500 → 500", 1)[0];
        assert_eq!(mail["tls"], true, "{mode}: {mail}");
        assert_eq!(mail["authenticated"], mode == "starttls", "{mode}: {mail}");
        assert_eq!(mail["from"], "dockerflow-sidecar@localhost");
        assert!(smtp.errors().is_empty() || !smtp.errors().join("\n").contains("Traceback"));
        drop(sidecar);

        // Without the CA the certificate is refused, and the mail with it.
        let untrusted = settings.replace(&format!("ca_file = \"{cert}\"\n"), "");
        let sidecar = SidecarBuilder::new(&app.url()).toml(&untrusted).start();
        get(&sidecar.url("/status/500"), &[]).await;
        let line = sidecar.stdout.wait_for("a refused certificate", |l| {
            l.contains("could not send an error mail")
        });
        assert!(line.to_lowercase().contains("certificate"), "{line}");
    }
}

/// Secrets in a request reach the app, and nothing else: not the logs, the
/// stored reports, the events, the hook payloads, the outbox or the mail.
#[tokio::test]
async fn no_secret_from_a_request_reaches_any_output() {
    let app = Upstream::start();
    let smtp = SmtpServer::start(&[]);
    let receiver = Receiver::start();
    let mut sidecar: Sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[logging]\nquerystring = true\n\
             [reports]\nkeep_query_strings = true\n\
             [errors]\nresponse_body_bytes = 4096\nsensitive_names = [\"^sessionid$\"]\n{}\n{}",
            email(smtp.port, ""),
            hook(
                "all",
                "\"upstream.error\", \"broken_link\", \"report.received\"",
                &receiver.url("/ok")
            )
        ))
        .start();
    let site = format!("http://{}", sidecar.addr);
    let secrets = [
        "S3CRET-QUERY-1",
        "S3CRET-HEADER-1",
        "S3CRET-HEADER-2",
        "S3CRET-COOKIE-1",
        "S3CRET-REFERER-1",
        "S3CRET-REPORT-1",
        "S3CRET-REPORT-2",
        "S3CRET-REPORT-3",
        "S3CRET-SESSION-1",
        "S3CRET-REFERER-2",
    ];

    // A server error whose page echoes the request.
    let reply = get(
        &sidecar
            .url("/echo-status/500?visible=yes&api_key=S3CRET-QUERY-1&sessionid=S3CRET-SESSION-1"),
        &[
            ("authorization", "Bearer S3CRET-HEADER-1"),
            ("x-api-key", "S3CRET-HEADER-2"),
            ("cookie", "csrftoken=S3CRET-COOKIE-1"),
            (
                "referer",
                "https://app.example/login?next=/&password=S3CRET-REFERER-2",
            ),
            ("x-original-url", "/echo-status/500?api_key=S3CRET-QUERY-1"),
        ],
    )
    .await;
    let page = String::from_utf8_lossy(&reply.body).into_owned();
    for secret in &secrets[..4] {
        assert!(
            page.contains(secret),
            "the app did not get {secret}: {page}"
        );
    }
    // A broken link from a page whose URL carries a secret.
    get(
        &sidecar.url("/missing/page?visible=yes"),
        &[(
            "referer",
            &format!("{site}/from?visible=yes&password=S3CRET-REFERER-1"),
        )],
    )
    .await;
    // A CSP report whose URLs and extra fields carry secrets.
    let report = serde_json::json!({"csp-report": {
        "document-uri": "https://app.example/page?visible=yes&token=S3CRET-REPORT-1",
        "blocked-uri": "https://cdn.example/x.js?signature=S3CRET-REPORT-2",
        "violated-directive": "script-src-elem",
        "effective-directive": "script-src-elem",
        "original-policy": "script-src 'self'",
        "disposition": "enforce",
        "status-code": 200,
        "x-debug": {"auth_token": "S3CRET-REPORT-3"}
    }});
    let stored = common::post_csp_report(&sidecar, report.to_string()).await;
    assert_eq!(stored.status, 204);

    smtp.wait_for("ERROR", 1);
    smtp.wait_for("Broken INTERNAL link", 1);
    let hooked = receiver.wait_for("/ok", 3);
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(0));

    let mut outputs: Vec<(String, String)> = vec![
        ("stdout".into(), sidecar.stdout.all().join("\n")),
        ("stderr".into(), sidecar.stderr.all().join("\n")),
    ];
    for mail in smtp.messages() {
        // Raw (quoted-printable can hide text) and decoded.
        outputs.push(("mail".into(), mail["raw"].as_str().unwrap().to_owned()));
        outputs.push((
            "mail subject".into(),
            mail["subject"].as_str().unwrap().to_owned(),
        ));
        outputs.push((
            "mail body".into(),
            mail["body"].as_str().unwrap().to_owned(),
        ));
    }
    for hook in &hooked {
        outputs.push(("hook body".into(), hook.body.clone()));
        outputs.push(("hook headers".into(), format!("{:?}", hook.headers)));
    }
    for entry in std::fs::read_dir(&sidecar.workdir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("dockerflow-sidecar.db") {
            let bytes = std::fs::read(&path).unwrap();
            outputs.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    for (name, text) in &outputs {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} reached {name}:\n{text}");
        }
    }
    // What is not secret is all there: the scrubbing is by name, not wholesale.
    let everything: String = outputs.iter().map(|(_, t)| t.as_str()).collect();
    assert!(everything.contains("visible=yes&api_key=********************"));
    assert!(everything.contains("https://app.example/page?visible=yes&token=********************"));
    let logged = sidecar.summary_for(reply.header("x-request-id").unwrap());
    assert_eq!(
        logged["Fields"]["querystring"],
        format!("visible=yes&api_key={MASK}&sessionid={MASK}")
    );
}
