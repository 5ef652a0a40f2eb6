//! Forwarding: requests reach the app unchanged but for the documented
//! proxy headers, and the app's answers come back unchanged.

mod common;

use bytes::Bytes;
use common::{get, raw, request, send, SidecarBuilder, Upstream};
use http_body_util::Full;
use serde_json::Value;

/// The header values the echo upstream saw for `name`.
fn seen(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn request_reaches_the_app_unchanged() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let reply = request(
        "PUT",
        &sidecar.url("/a/%7Eb/../c//d?x=1&y=%20z&x=2"),
        &[
            ("x-custom", "one"),
            ("content-type", "text/plain"),
            ("host", "app.example.com"),
        ],
        "the body",
    )
    .await;
    assert_eq!(reply.status, 200);
    let echo = reply.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(
        echo["uri"], "/a/%7Eb/../c//d?x=1&y=%20z&x=2",
        "path and query exactly as sent"
    );
    assert_eq!(echo["body"], "the body");
    assert_eq!(seen(&echo, "x-custom"), ["one"]);
    assert_eq!(seen(&echo, "content-type"), ["text/plain"]);
    assert_eq!(
        seen(&echo, "host"),
        ["app.example.com"],
        "Host is preserved"
    );
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
}

#[tokio::test]
async fn forwarded_headers_are_appended_not_replaced() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let reply = get(
        &sidecar.url("/"),
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    let echo = reply.json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(
        seen(&echo, "x-forwarded-proto"),
        ["https"],
        "set only when absent"
    );
}

#[tokio::test]
async fn request_id_is_generated_forwarded_and_returned() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();

    let reply = get(&sidecar.url("/"), &[("x-request-id", "abc-123")]).await;
    assert_eq!(seen(&reply.json(), "x-request-id"), ["abc-123"]);
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));

    for headers in [vec![], vec![("x-request-id", "")]] {
        let reply = get(&sidecar.url("/"), &headers).await;
        let rid = reply.header("x-request-id").unwrap().to_owned();
        let parsed = uuid::Uuid::parse_str(&rid).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(seen(&reply.json(), "x-request-id"), [rid]);
    }
}

#[tokio::test]
async fn request_id_header_name_is_configurable() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_LOGGING__REQUEST_ID_HEADER", "X-Trace")
        .start();
    let reply = get(&sidecar.url("/"), &[("x-trace", "t-1")]).await;
    assert_eq!(seen(&reply.json(), "x-trace"), ["t-1"]);
    assert_eq!(reply.header("x-trace"), Some("t-1"));
    assert!(reply.header("x-request-id").is_none());
}

#[tokio::test]
async fn hop_by_hop_and_connection_named_headers_are_stripped_both_ways() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close, x-client-hop\r\nConnection: X-Other\r\n\
          x-client-hop: 1\r\nx-other: 2\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\n\
          TE: trailers, deflate\r\nx-end-to-end: 3\r\n\r\n",
    );
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let echo: Value = serde_json::from_str(body).unwrap();
    for name in ["x-client-hop", "x-other", "keep-alive", "proxy-connection"] {
        assert!(
            seen(&echo, name).is_empty(),
            "{name} reached the app: {echo}"
        );
    }
    assert_eq!(seen(&echo, "te"), ["trailers"], "TE: trailers is kept");
    assert_eq!(seen(&echo, "x-end-to-end"), ["3"]);
    assert!(seen(&echo, "connection")
        .iter()
        .all(|v| !v.contains("x-client-hop")));

    let reply = get(&sidecar.url("/hop"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-kept"), Some("yes"));
    assert!(
        reply.header("x-upstream-hop").is_none(),
        "{:?}",
        reply.headers
    );
    assert!(reply.header("keep-alive").is_none());
}

#[tokio::test]
async fn absolute_form_target_still_goes_to_upstream() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"GET http://other.example:9999/elsewhere?q=1 HTTP/1.1\r\nHost: other.example:9999\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let echo: Value =
        serde_json::from_str(&response[response.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(echo["uri"], "/elsewhere?q=1");
    assert_eq!(
        seen(&echo, "host"),
        ["other.example:9999"],
        "RFC 9112 §3.2.2: the target's authority is the host"
    );
    assert_eq!(app.hits(), 1);
}

#[tokio::test]
async fn connect_is_refused() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn chunked_request_trailers_reach_the_app() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let echo: Value =
        serde_json::from_str(&response[response.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(echo["body"], "hello world");
    assert_eq!(echo["trailers"], serde_json::json!([["x-sum", "42"]]));
}

#[tokio::test]
async fn response_trailers_reach_a_client_that_accepts_them() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"GET /trailers HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{response}");
    assert!(lower.contains("hello "), "{response}");
    assert!(
        lower.contains("\r\n0\r\nx-checksum: abc123\r\n\r\n"),
        "{response}"
    );
}

#[tokio::test]
async fn websocket_style_upgrade_is_tunnelled_both_ways() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let (mut stream, head) = common::open_tunnel(sidecar.addr, "tun-1");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in ["ping", "second message"] {
        common::assert_echo(&mut stream, message);
    }
    drop(stream);
    let line = sidecar.summary_for("tun-1");
    assert_eq!(line["Fields"]["code"], 101);
}

#[tokio::test]
async fn h2c_prior_knowledge_is_forwarded_with_host_from_authority() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let req = http::Request::builder()
        .uri("http://app.example:8443/h2?x=1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // Connect to the sidecar, but with :authority naming another host.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(FixedConnector(sidecar.addr));
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["uri"], "/h2?x=1");
    assert_eq!(seen(&echo, "host"), ["app.example:8443"]);
    assert_eq!(echo["version"], "HTTP/1.1");

    let reply = send(
        http::Request::builder()
            .uri(sidecar.url("/__lbheartbeat__"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        true,
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// Connects every request to one address, whatever its URI says.
#[derive(Clone)]
struct FixedConnector(std::net::SocketAddr);

impl tower_service::Service<http::Uri> for FixedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::connect(addr).await?,
            ))
        })
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_502_with_an_error_line() {
    let closed = common::closed_port();
    let port = closed.port;
    let sidecar = SidecarBuilder::new(&format!("http://127.0.0.1:{port}")).start();
    let reply = get(&sidecar.url("/x"), &[("x-request-id", "down-1")]).await;
    assert_eq!(reply.status, 502);
    assert!(String::from_utf8_lossy(&reply.body).contains("upstream unreachable"));
    let line = sidecar.summary_for("down-1");
    assert_eq!(line["Severity"], 3);
    assert_eq!(line["Fields"]["errno"], 502);
    assert_eq!(line["Fields"]["code"], 502);
    assert!(
        line["Fields"]["msg"].as_str().unwrap().contains("refused"),
        "{line}"
    );
}

#[tokio::test]
async fn slow_upstream_gives_504() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_UPSTREAM__RESPONSE_HEADER_TIMEOUT", "200ms")
        .start();
    let reply = get(&sidecar.url("/slow/3000"), &[("x-request-id", "slow-1")]).await;
    assert_eq!(reply.status, 504);
    let line = sidecar.summary_for("slow-1");
    assert_eq!(line["Severity"], 3);
    assert_eq!(line["Fields"]["errno"], 504);
    assert!(
        line["Fields"]["msg"].as_str().unwrap().contains("200ms"),
        "{line}"
    );
    // The next request is served normally.
    assert_eq!(get(&sidecar.url("/slow/0"), &[]).await.status, 200);
}

#[tokio::test]
async fn app_statuses_and_bodies_come_back_unchanged() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    for code in [201u16, 404, 418, 500, 503] {
        let reply = get(&sidecar.url(&format!("/status/{code}")), &[]).await;
        assert_eq!(reply.status, code);
        assert_eq!(reply.body, format!("status {code}"));
    }
    let line = sidecar
        .stdout
        .wait_for("the 500 line", |l| l.contains("\"path\":\"/status/500\""));
    assert!(
        line.contains("\"Severity\":6"),
        "an app's 500 is not a proxy failure: {line}"
    );
}

#[tokio::test]
async fn unix_socket_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let app = Upstream::start_unix(&socket);
    let sidecar = SidecarBuilder::new(&format!("unix:{}", socket.display())).start();
    let reply = get(&sidecar.url("/via-unix"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["uri"], "/via-unix");
    assert_eq!(app.hits(), 1);
}

#[tokio::test]
async fn large_upload_and_download_stream_without_growing_memory() {
    use http_body_util::BodyExt;
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    // Warm up the pool and allocator before measuring.
    assert_eq!(get(&sidecar.url("/"), &[]).await.status, 200);
    let before = sidecar.rss_kib();

    const SIZE: u64 = 256 * 1024 * 1024;
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let stream =
        futures_util::stream::iter((0..SIZE / chunk.len() as u64).map(move |_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
        }));
    let req = http::Request::builder()
        .method("POST")
        .uri(sidecar.url("/count"))
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let counted: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(counted["bytes"], SIZE);

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(
            http::Request::get(sidecar.url(&format!("/download/{SIZE}")))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame
            .unwrap()
            .into_data()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(received, SIZE);

    let growth_kib = sidecar.rss_kib().saturating_sub(before);
    assert!(
        growth_kib < 16 * 1024,
        "RSS grew by {growth_kib} KiB moving 2 × 256 MiB"
    );
}

/// src/trim.rs: the pages a burst of traffic used are given back once the
/// traffic stops, instead of staying with the idle worker for good.
#[tokio::test(flavor = "multi_thread")]
async fn memory_a_burst_used_is_given_back_once_it_stops() {
    const CONNECTIONS: usize = 64;
    const EACH: usize = 60;
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "1")
        .start();
    assert_eq!(get(&sidecar.url("/"), &[]).await.status, 200);
    let before = sidecar.status_kib("RssAnon");

    let client = common::keep_alive_client();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (client, url) = (client.clone(), sidecar.url("/burst"));
            tokio::spawn(async move {
                for _ in 0..EACH {
                    let resp = client
                        .request(http::Request::get(&url).body(Full::default()).unwrap())
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    http_body_util::BodyExt::collect(resp.into_body())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    drop(client);
    let burst = sidecar.status_kib("RssAnon");
    // Without the collection the burst's pages stay (about 600 KiB to
    // 1 MiB in a release build); it must have left something to give back.
    assert!(
        burst >= before + 256,
        "the burst left no memory to give back: {before} KiB before, {burst} KiB after"
    );

    // The watcher samples once a second: a quiet second, then the worker's
    // next park (and a follow-up two quiet seconds later). The deadline is
    // for a slow machine; here it comes back within about 2 s.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut now = burst;
    // Back to where it was, or lower: the collection also frees what
    // start-up left. Without it a debug build stays ~200 KiB above, a
    // release build 600 KiB to 1 MiB.
    while now > before {
        assert!(
            std::time::Instant::now() < end,
            "anonymous memory {before} KiB before a burst, {burst} KiB after it, \
             still {now} KiB 30 s later"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        now = sidecar.status_kib("RssAnon");
    }
    assert_eq!(app.hits(), 1 + CONNECTIONS * EACH);
}

#[tokio::test]
async fn slow_upload_is_not_a_slow_app() {
    // The response-header timeout starts once the request body has been
    // sent: an upload longer than it must still succeed.
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_UPSTREAM__RESPONSE_HEADER_TIMEOUT", "300ms")
        .start();
    let stream = Box::pin(futures_util::stream::unfold(0u8, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(
                b"0123456789",
            ))),
            i + 1,
        ))
    }));
    let req = http::Request::builder()
        .method("POST")
        .uri(sidecar.url("/count"))
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["bytes"], 40);
}

#[tokio::test]
async fn http10_request_without_host_gets_the_upstream_host() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(sidecar.addr, b"GET /old HTTP/1.0\r\n\r\n");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    let echo: Value =
        serde_json::from_str(&response[response.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(seen(&echo, "host"), [app.addr.unwrap().to_string()]);
}

#[tokio::test]
async fn unrequested_switching_protocols_is_a_502() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let reply = get(&sidecar.url("/bogus-101"), &[("x-request-id", "b101")]).await;
    assert_eq!(reply.status, 502);
    let line = sidecar.summary_for("b101");
    assert_eq!(line["Fields"]["errno"], 502);
}

#[tokio::test]
async fn malformed_request_gets_400_and_a_line() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let response = raw(
        sidecar.addr,
        b"GET /x HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let line = sidecar.stdout.wait_for("the 400 line", |l| {
        l.contains("request.summary") && l.contains("\"code\":400")
    });
    assert!(
        line.contains("\"Severity\":3") && line.contains("malformed request"),
        "{line}"
    );
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn broken_request_body_is_the_clients_fault_not_the_apps() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    raw(
        sidecar.addr,
        b"POST /count HTTP/1.1\r\nHost: h\r\nx-request-id: badbody\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    );
    let line = sidecar.summary_for("badbody");
    assert_eq!(line["Fields"]["code"], 400, "{line}");
    assert!(
        line["Fields"]["msg"]
            .as_str()
            .unwrap()
            .contains("bad request body"),
        "{line}"
    );
}

#[tokio::test]
async fn client_that_leaves_early_is_logged_as_499() {
    use std::io::Write;
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    let mut stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    stream
        .write_all(b"GET /slow/1500 HTTP/1.1\r\nHost: h\r\nx-request-id: gone-1\r\n\r\n")
        .unwrap();
    app.wait_for_hits(1).await;
    drop(stream);
    let line = sidecar.summary_for("gone-1");
    assert_eq!(line["Fields"]["code"], 499, "{line}");
}
