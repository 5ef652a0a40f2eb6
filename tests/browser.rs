//! A real browser: headless Chromium (Debian's `chromium`) loads a page
//! served through the sidecar whose Content-Security-Policy it violates, and
//! the browser's own reports are answered, logged and stored.

mod common;

use std::process::{Child, Command, Stdio};

use common::{SidecarBuilder, Upstream};
use serde_json::Value;

/// Chromium, killed when dropped (its profile directory goes with it).
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `url` in headless Chromium and keeps it running (a remote
/// debugging port keeps it alive, unlike --dump-dom, which exits before
/// reports are sent).
fn open(url: &str) -> Browser {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Chromium is not installed: scripts/test-services.sh installs Debian's chromium");
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    Browser {
        child,
        _profile: profile,
    }
}

#[tokio::test]
async fn chromium_csp_reports_are_stored_and_logged() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let _browser = open(&sidecar.url("/csp-page?user=secret"));

    // script-src-elem (inline script), style-src-elem (inline style),
    // style-src-attr (style attribute), img-src (the image).
    let lines = sidecar.stdout.wait_for_count("four report lines", 4, |l| {
        l.contains("\"Type\":\"report\"")
    });
    let mut directives: Vec<String> = lines
        .iter()
        .map(|l| {
            let json: Value = serde_json::from_str(l).unwrap();
            assert_eq!(json["Fields"]["type"], "csp-violation");
            assert_eq!(
                json["Fields"]["url"],
                sidecar.url("/csp-page"),
                "query string cut"
            );
            assert!(json["Fields"]["user_agent"]
                .as_str()
                .unwrap()
                .contains("Chrome"));
            json["Fields"]["directive"].as_str().unwrap().to_owned()
        })
        .collect();
    directives.sort();
    directives.dedup();
    assert_eq!(
        directives,
        [
            "img-src",
            "script-src-elem",
            "style-src-attr",
            "style-src-elem"
        ]
    );

    // The browser's report requests were answered 204 (their summary lines
    // are written when each answer has been sent: wait for them).
    let lines = sidecar
        .stdout
        .wait_for_count("four report requests", 4, |l| {
            l.contains("\"Type\":\"request.summary\"") && l.contains("\"path\":\"/__cspreport__\"")
        });
    let summaries: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report_posts: Vec<&Value> = summaries.iter().collect();
    assert!(report_posts
        .iter()
        .all(|s| s["Fields"]["code"] == 204 && s["Fields"]["method"] == "POST"));

    let end = std::time::Instant::now() + common::DEADLINE;
    loop {
        let out = sidecar.cli(&["reports", "list", "--json", "--type", "csp-violation"]);
        let rows = String::from_utf8_lossy(&out.stdout).lines().count();
        if rows >= 4 {
            break;
        }
        assert!(std::time::Instant::now() < end, "{rows} reports stored");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
