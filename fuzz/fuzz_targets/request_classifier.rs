#![no_main]
//! The per-request decisions made from the raw request target before any
//! answer: `router::classify` on the path (as a raw string, and as hyper
//! hands it over, parsed into a `Uri`, absolute-form included), the report
//! paths (`Intake::matches` is an exact comparison with the configured
//! ones), and the query string as `request.summary` logs it (scrubbed, then
//! percent-decoded).
//!
//! Beyond "no panic": `classify` is deterministic and only the exact
//! Dockerflow paths (one trailing slash allowed) are Dockerflow routes: no
//! percent-decoding, no dot segments, no doubled slashes, never the query.
//! Scrubbing a query keeps its pairs and names and masks only values.

use std::sync::LazyLock;

use dockerflow_sidecar::config::ReportsConfig;
use dockerflow_sidecar::router::{classify, Route};
use dockerflow_sidecar::scrub::{Scrubber, Secrets, MASK};
use libfuzzer_sys::fuzz_target;

static SCRUBBER: LazyLock<Scrubber> = LazyLock::new(Scrubber::default);
static REPORT_PATHS: LazyLock<Vec<String>> = LazyLock::new(|| ReportsConfig::default().paths);

/// The routes by exact path: the specification `classify` must meet.
fn expected(path: &str) -> Route {
    match path {
        "/__version__" | "/__version__/" => Route::Version,
        "/__heartbeat__" | "/__heartbeat__/" => Route::Heartbeat,
        "/__lbheartbeat__" | "/__lbheartbeat__/" => Route::LbHeartbeat,
        _ => Route::Proxy,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        let route = classify(path);
        assert_eq!(
            route,
            classify(path),
            "classify({path:?}) is not deterministic"
        );
        assert_eq!(route, expected(path), "classify({path:?})");
    }

    // What hyper hands the router.
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    let path = uri.path();
    let route = classify(path);
    assert_eq!(route, expected(path), "classify({path:?}) of {uri}");
    if route != Route::Proxy {
        assert!(REPORT_PATHS.iter().all(|p| p != path));
    }

    if let Some(query) = uri.query() {
        let mut secrets = Secrets::default();
        let scrubbed = SCRUBBER.query(query, &mut secrets);
        let pairs: Vec<&str> = query.split('&').collect();
        let out: Vec<&str> = scrubbed.split('&').collect();
        assert_eq!(pairs.len(), out.len(), "{query:?} -> {scrubbed:?}");
        for (pair, out) in pairs.iter().zip(&out) {
            if pair != out {
                let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
                assert_eq!(*out, format!("{name}={MASK}"));
            }
        }
        // What the line carries.
        let _ = percent_encoding::percent_decode_str(&scrubbed).decode_utf8_lossy();
        let _ = secrets.redact(query);
    }
});
