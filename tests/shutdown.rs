//! Graceful shutdown: fail health first, keep serving for the drain period,
//! then close the listener and let in-flight work finish.

mod common;

use common::{get, SidecarBuilder, Upstream};

#[tokio::test]
async fn request_in_flight_at_sigterm_still_completes() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        .shutdown("1500ms", "10s")
        .start();
    let slow_url = sidecar.url("/slow/4000");
    let slow = tokio::spawn(async move { get(&slow_url, &[("x-request-id", "inflight-1")]).await });
    app.wait_for_hits(1).await;

    sidecar.signal(libc::SIGTERM);
    sidecar
        .stdout
        .wait_for("draining", |l| l.contains("draining"));
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 503);
    assert_eq!(get(&sidecar.url("/__heartbeat__"), &[]).await.status, 503);
    assert_eq!(
        get(&sidecar.url("/during-drain"), &[]).await.status,
        200,
        "traffic is still served"
    );

    sidecar
        .stdout
        .wait_for("listener closed", |l| l.contains("listener closed"));
    assert!(
        !slow.is_finished(),
        "the slow request should still be in flight when the listener closes"
    );
    assert!(
        std::net::TcpStream::connect(sidecar.addr).is_err(),
        "no new connections after the drain"
    );

    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "slow done");
    assert_eq!(sidecar.wait_exit(), Some(0));
    // Every line was flushed before exit: the in-flight request's and the last one.
    let summary = sidecar.summary_for("inflight-1");
    assert_eq!(summary["Fields"]["code"], 200);
    assert!(sidecar
        .stdout
        .all()
        .last()
        .unwrap()
        .contains("\"msg\":\"stopped\""));
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url()).start();
    assert_eq!(get(&sidecar.url("/"), &[]).await.status, 200);
    sidecar.signal(libc::SIGINT);
    assert_eq!(sidecar.wait_exit(), Some(0));
    sidecar
        .stdout
        .wait_for("the signal line", |l| l.contains("SIGINT"));
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SHUTDOWN__DRAIN", "10m")
        .start();
    sidecar.signal(libc::SIGTERM);
    sidecar
        .stdout
        .wait_for("draining", |l| l.contains("draining"));
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(1));
    sidecar
        .stdout
        .wait_for("the second-signal line", |l| l.contains("second signal"));
}

#[tokio::test]
async fn open_tunnel_keeps_the_process_until_it_closes() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url()).start();
    let (mut stream, head) = common::open_tunnel(sidecar.addr, "tun-2");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    sidecar.signal(libc::SIGTERM);
    sidecar
        .stdout
        .wait_for("listener closed", |l| l.contains("listener closed"));
    // The tunnel still works after the listener closed.
    common::assert_echo(&mut stream, "still here");
    drop(stream);
    assert_eq!(sidecar.wait_exit(), Some(0));
    assert_eq!(sidecar.summary_for("tun-2")["Fields"]["code"], 101);
}

/// A client whose connection was accepted just before the stop, and whose
/// request arrives just after it, is still answered: the connection is not
/// closed unread as if it were idle.
#[tokio::test]
async fn a_request_on_a_connection_opened_just_before_the_stop_is_served() {
    use std::io::{Read, Write};
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url()).shutdown("0s", "5s").start();
    let mut stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    wait_until_accepted(&sidecar).await;

    sidecar.signal(libc::SIGTERM);
    sidecar
        .stdout
        .wait_for("the listener closing", |l| l.contains("listener closed"));
    stream
        .write_all(b"GET /late HTTP/1.1\r\nHost: h\r\nx-request-id: late-1\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response:?}");
    assert_eq!(sidecar.wait_exit(), Some(0));
    assert_eq!(sidecar.summary_for("late-1")["Fields"]["code"], 200);
}

/// A connection accepted just before the stop that sends nothing gets the
/// rest of its first second, not the whole grace period: the process exits
/// soon after, with nothing in flight.
#[tokio::test]
async fn a_silent_connection_opened_just_before_the_stop_does_not_hold_the_exit() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        .shutdown("0s", "30s")
        .start();
    let _stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    wait_until_accepted(&sidecar).await;
    let stopped = std::time::Instant::now();
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(0));
    let took = stopped.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "exit took {took:?} with a 30 s grace period"
    );
}

/// Waits until the sidecar has accepted one connection: its gauge of open
/// connections says so.
async fn wait_until_accepted(sidecar: &common::Sidecar) {
    let metrics = sidecar.admin_url("/metrics");
    let end = std::time::Instant::now() + common::DEADLINE;
    while !String::from_utf8_lossy(&get(&metrics, &[]).await.body)
        .contains("dockerflow_sidecar_open_connections 1")
    {
        assert!(std::time::Instant::now() < end, "never accepted");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
