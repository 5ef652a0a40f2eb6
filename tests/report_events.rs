//! `report.received` on the in-process bus: an App served in this process,
//! a test subscriber, a real HTTP client.

mod common;

use std::sync::Arc;

use dockerflow_sidecar::config::{Config, UpstreamUrl};
use dockerflow_sidecar::events::EventData;
use dockerflow_sidecar::mozlog::{Logger, Sink};
use dockerflow_sidecar::App;

#[tokio::test]
async fn accepted_reports_are_published_and_noise_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.admin.enabled = false;
    config.upstream.url = UpstreamUrl::try_from("http://127.0.0.1:9".to_owned()).unwrap();
    config.state.path = dir.path().join("state.db");
    config.shutdown.drain = std::time::Duration::ZERO;
    let logger = Arc::new(Logger::new(
        "test".into(),
        config.logging.format,
        Sink::new(Box::new(std::io::sink())).unwrap(),
    ));
    let app = Arc::new(App::new(config, logger).unwrap());
    let mut events = app.bus.subscribe();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dockerflow_sidecar::serve(app.clone(), listener, async {
        let _ = stopped.await;
    }));

    let url = format!("http://{addr}/__cspreport__");
    let noise = r#"{"csp-report": {"document-uri": "https://a.example/", "violated-directive": "script-src", "blocked-uri": "chrome-extension"}}"#;
    let real = r#"{"csp-report": {"document-uri": "https://a.example/p?t=1", "violated-directive": "img-src 'none'", "blocked-uri": "https://x.example/i.png"}}"#;
    for body in [noise, real] {
        let reply = common::request(
            "POST",
            &url,
            &[("content-type", "application/csp-report")],
            body,
        )
        .await;
        assert_eq!(reply.status, 204);
    }
    let event = tokio::time::timeout(common::DEADLINE, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.kind, "report.received");
    let EventData::ReportReceived(fields) = &event.data else {
        panic!("{event:?}")
    };
    assert_eq!(fields.url.as_deref(), Some("https://a.example/p"));
    assert_eq!(fields.directive.as_deref(), Some("img-src"));
    let json = serde_json::to_value(&*event).unwrap();
    assert_eq!(json["data"]["blocked_url"], "https://x.example/i.png");
    assert!(
        events.try_recv().is_err(),
        "the extension noise published nothing"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
