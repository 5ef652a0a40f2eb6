//! The in-process event bus: heartbeat transitions, and only transitions,
//! become events (a test subscriber on the real bus, a real upstream).

mod common;

use std::time::Duration;

use common::Upstream;
use dockerflow_sidecar::checks::Registry;
use dockerflow_sidecar::config::{CheckConfig, CheckLevel, Config, UpstreamUrl};
use dockerflow_sidecar::dockerflow::Heartbeat;
use dockerflow_sidecar::events::{Bus, Event, EventData};
use std::sync::Arc;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

/// A heartbeat with one upstream check of `level` on the app's `/health`,
/// no cache, and a subscription to its bus.
fn heartbeat_on(app: &Upstream, level: CheckLevel) -> (Heartbeat, Receiver<Arc<Event>>) {
    let mut config = Config::default();
    config.admin.enabled = false;
    config.upstream.url = UpstreamUrl::try_from(app.url()).unwrap();
    config.heartbeat.cache_ttl = Duration::ZERO;
    config.heartbeat.checks = vec![CheckConfig {
        path: Some("/health".into()),
        level,
        ..CheckConfig::upstream()
    }];
    let bus = Bus::default();
    let events = bus.subscribe();
    let heartbeat = Heartbeat::new(
        Registry::from_config(&config).unwrap(),
        &config.heartbeat,
        bus,
        Default::default(),
    );
    (heartbeat, events)
}

#[tokio::test]
async fn events_are_published_only_on_transitions() {
    let app = Upstream::start();
    let (heartbeat, mut events) = heartbeat_on(&app, CheckLevel::Error);

    heartbeat.report().await;
    heartbeat.report().await;
    assert!(
        matches!(events.try_recv(), Err(TryRecvError::Empty)),
        "passing from the start is no event"
    );

    app.set_health(503);
    heartbeat.report().await;
    let failed = events.try_recv().expect("a heartbeat.failed event");
    assert_eq!(failed.kind, "heartbeat.failed");
    let EventData::HeartbeatFailed { status, checks } = &failed.data else {
        panic!("wrong data: {failed:?}")
    };
    assert_eq!(*status, "error");
    assert_eq!(checks["upstream"].level, 40);
    assert!(checks["upstream"].messages["sidecar.E002"].contains("answered 503"));
    let json = serde_json::to_value(&*failed).unwrap();
    assert_eq!(json["type"], "heartbeat.failed");
    assert!(json["id"].as_str().unwrap().len() == 36 && json["time"].is_string());
    assert_eq!(json["data"]["checks"]["upstream"]["status"], "error");

    heartbeat.report().await;
    heartbeat.report().await;
    assert!(
        matches!(events.try_recv(), Err(TryRecvError::Empty)),
        "still failing is no event"
    );

    app.set_health(200);
    heartbeat.report().await;
    let passed = events.try_recv().expect("a heartbeat.passed event");
    assert_eq!(passed.kind, "heartbeat.passed");
    let EventData::HeartbeatPassed { status, recovered } = &passed.data else {
        panic!("wrong data: {passed:?}")
    };
    assert_eq!(*status, "ok");
    assert_eq!(recovered, &["upstream"]);
    heartbeat.report().await;
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(app.hits(), 7, "cache_ttl 0: every report is a round");
}

#[tokio::test]
async fn a_warning_is_not_a_failure() {
    let app = Upstream::start();
    let (heartbeat, mut events) = heartbeat_on(&app, CheckLevel::Warning);
    app.set_health(500);
    let report = heartbeat.report().await;
    assert_eq!(report.level().name(), "warning");
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
}
