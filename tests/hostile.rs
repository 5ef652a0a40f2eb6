//! Issue 10, hostile input: request smuggling vectors, odd request targets,
//! oversize heads, lookalike paths, slow clients, HTTP/2 abuse and report
//! floods. Every case checks what the client gets and what reaches the app:
//! a request the sidecar refuses must not reach the app at all, and nothing
//! the sidecar forwards may be read by the app differently than by us.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, Sidecar, SidecarBuilder, Upstream, DEADLINE};

/// Writes `request` on a new connection and reads what comes back until the
/// sidecar closes it (or `limit` passes: then the result says so).
fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let closed = match stream.read_to_end(&mut out) {
        Ok(_) => true,
        // A reset also closes.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Runs blocking socket code off the test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn sidecar(app: &Upstream) -> Sidecar {
    SidecarBuilder::new(&app.url()).start()
}

/// Smuggling: each head is one that two parsers could read differently. The
/// sidecar refuses it with 400 before anything reaches the app, closes the
/// connection, and the request hidden behind it is never seen by the app.
#[tokio::test]
async fn smuggling_vectors_are_refused_before_reaching_the_app() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "two different Content-Lengths",
            format!("POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc{smuggled}"),
        ),
        (
            "Content-Length list",
            format!("POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 40\r\n\r\nabc{smuggled}"),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!("POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "obs-fold header",
            format!("GET /a HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\n\r\n{smuggled}"),
        ),
        (
            "space before the colon",
            format!("POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc{smuggled}"),
        ),
        (
            "bare CR in a header",
            format!("GET /a HTTP/1.1\r\nHost: h\r\nX-A: a\rGET /smuggled\r\n\r\n{smuggled}"),
        ),
        (
            "NUL in a header value",
            format!("GET /a HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n{smuggled}"),
        ),
        (
            "two Host headers",
            format!("GET /a HTTP/1.1\r\nHost: h\r\nHost: evil\r\n\r\n{smuggled}"),
        ),
        (
            "HTTP/1.1 without Host",
            format!("GET /a HTTP/1.1\r\nX: y\r\n\r\n{smuggled}"),
        ),
        (
            "space in the request target",
            format!("GET /a b HTTP/1.1\r\nHost: h\r\n\r\n{smuggled}"),
        ),
        (
            "unknown HTTP version",
            format!("GET /a HTTP/1.7\r\nHost: h\r\n\r\n{smuggled}"),
        ),
    ];
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for (name, request) in cases {
        let addr = sidecar.addr;
        let (response, closed) =
            blocking(move || exchange(addr, request.as_bytes(), DEADLINE)).await;
        let first = response.lines().next().unwrap_or("").to_owned();
        // Refused, closed, and one response only: the hidden request was
        // never parsed.
        if !(closed
            && response.starts_with("HTTP/1.1 400 ")
            && response.matches("HTTP/1.1 ").count() == 1)
        {
            wrong.push(format!("{name}: {first} closed={closed}"));
        }
        report.push(format!("{name}: {first}"));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(app.hits(), 0, "{report:#?}");
    // Each refusal still has its summary line.
    sidecar
        .stdout
        .wait_for_count("400 lines", report.len(), |l| l.contains("\"code\":400"));
}

/// Transfer-Encoding and Content-Length together (RFC 9112 §6.3): the body
/// is read as chunked, the Content-Length is dropped, the app gets the
/// request re-framed as chunked, and the connection closes after the
/// response, so the bytes behind the chunked body are never read as a
/// request.
#[tokio::test]
async fn transfer_encoding_with_content_length_is_chunked_and_closes() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let addr = sidecar.addr;
    let request = b"POST /count HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    let (response, closed) = blocking(move || exchange(addr, request, DEADLINE)).await;
    assert!(closed);
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.ends_with("{\"bytes\":3}"), "{response}");
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    assert_eq!(app.hits(), 1);
}

/// Chunked bodies with bad chunk sizes: the head has gone to the app by
/// then (bodies stream), so the app sees a request whose body breaks off and
/// a closed connection, never a second request; the client gets 400.
#[tokio::test]
async fn bad_chunk_sizes_end_the_request_with_400_and_never_a_second_request() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    let cases = [
        ("not hex", format!("zz\r\nabc\r\n0\r\n\r\n{smuggled}")),
        (
            "overflow",
            format!("fffffffffffffffff\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        ("negative", format!("-3\r\nabc\r\n0\r\n\r\n{smuggled}")),
        ("size too small", format!("1\r\nabc\r\n0\r\n\r\n{smuggled}")),
        (
            "bare LF after size",
            format!("3\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "bare CR in a chunk extension",
            format!("3;a\rb\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "bare LF ending the trailers",
            format!("3\r\nabc\r\n0\r\n\n{smuggled}"),
        ),
    ];
    for (name, body) in cases {
        let request =
            format!("POST /count HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let addr = sidecar.addr;
        let (response, closed) =
            blocking(move || exchange(addr, request.as_bytes(), DEADLINE)).await;
        assert!(closed, "{name}: connection left open");
        assert_eq!(status_of(&response), 400, "{name}: {response}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{name}: {response}"
        );
    }
    // No /smuggled request ever reached the app.
    sidecar
        .stdout
        .wait_for_count("400 lines", 7, |l| l.contains("\"code\":400"));
    let smuggled_seen = sidecar
        .summaries()
        .iter()
        .filter(|l| l["Fields"]["path"] == "/smuggled")
        .count();
    assert_eq!(smuggled_seen, 0);
    assert!(app.hits() <= 7, "{}", app.hits());
}

/// Bare LF line endings are accepted, as RFC 9112 §2.2 allows; the request
/// is re-framed for the app with CRLF, so the app cannot read it differently.
#[tokio::test]
async fn bare_lf_requests_are_reframed_for_the_app() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let addr = sidecar.addr;
    let (response, _) = blocking(move || {
        exchange(
            addr,
            b"GET /lf HTTP/1.1\nHost: h\nX-Test: one\nConnection: close\n\n",
            DEADLINE,
        )
    })
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["uri"], "/lf");
    assert!(
        echo["headers"].to_string().contains(r#"["x-test","one"]"#),
        "{echo}"
    );
    assert_eq!(app.hits(), 1);
}

/// Request targets: absolute-form goes to the configured app (its host is
/// only the Host header), authority-form and asterisk-form are refused for
/// anything but their own methods, CONNECT is refused.
#[tokio::test]
async fn request_target_forms() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let cases: [(&str, &[u8], u16); 5] = [
        (
            "absolute-form",
            b"GET http://evil.example:9/abs?q=1 HTTP/1.1\r\nHost: evil.example:9\r\nConnection: close\r\n\r\n",
            200,
        ),
        (
            "authority-form with GET",
            b"GET evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "CONNECT",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "asterisk-form with GET",
            b"GET * HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "absolute-form with another scheme",
            b"GET ftp://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            200,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request, status) in cases {
        let addr = sidecar.addr;
        let (response, _) = blocking(move || exchange(addr, request, DEADLINE)).await;
        if status_of(&response) != status {
            wrong.push(format!("{name}: {}", response.lines().next().unwrap_or("")));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Only the two absolute-form requests reached the app, as plain paths.
    assert_eq!(app.hits(), 2);
    let paths: Vec<String> = sidecar
        .stdout
        .wait_for_count("200 lines", 2, |l| l.contains("\"code\":200"))
        .iter()
        .map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).unwrap();
            line["Fields"]["path"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(paths, ["/abs", "/x"]);
}

/// Oversize heads get 431, whether by bytes or by count of headers, and
/// reach nothing.
#[tokio::test]
async fn oversize_heads_get_431() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500 * 1024)
    );
    let many = format!(
        "GET / HTTP/1.1\r\nHost: h\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    for (name, request) in [("500 KiB header", big), ("200 headers", many)] {
        let addr = sidecar.addr;
        let (response, closed) =
            blocking(move || exchange(addr, request.as_bytes(), DEADLINE)).await;
        assert!(closed, "{name}");
        assert_eq!(status_of(&response), 431, "{name}: {response}");
    }
    assert_eq!(app.hits(), 0);
    sidecar
        .stdout
        .wait_for_count("431 lines", 2, |l| l.contains("\"code\":431"));
}

/// Lookalike paths are not the Dockerflow routes: they go to the app
/// exactly as written (no decoding, no dot-segment or slash normalisation),
/// so the app decides what they mean, as it would without the sidecar.
#[tokio::test]
async fn lookalike_dockerflow_paths_reach_the_app_byte_for_byte() {
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let paths = [
        "/__heartbeat__/..",
        "//__heartbeat__",
        "/%5F%5Fheartbeat%5F%5F",
        "/__heartbeat__%2F",
        "/__heartbeat__;x",
        "/./__heartbeat__",
        "/__lbheartbeat__/../__version__",
        "/__HEARTBEAT__",
    ];
    for path in paths {
        let addr = sidecar.addr;
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let (response, _) = blocking(move || exchange(addr, request.as_bytes(), DEADLINE)).await;
        assert_eq!(status_of(&response), 200, "{path}: {response}");
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(echo["uri"], path, "{path}");
    }
    assert_eq!(app.hits(), paths.len());
    // The real ones, with one trailing slash allowed and a query ignored.
    for path in ["/__heartbeat__/", "/__lbheartbeat__?x=1", "/__version__"] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert!(
            [200, 404].contains(&reply.status),
            "{path}: {}",
            reply.status
        );
    }
    assert_eq!(
        app.hits(),
        paths.len() + 1,
        "only the heartbeat's own upstream check"
    );
}

/// Slowloris: a head trickled a byte at a time is cut off when the head
/// timeout (server.idle_timeout) runs out, however steadily bytes arrive.
#[tokio::test]
async fn slowloris_heads_are_cut_off_at_the_head_timeout() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__IDLE_TIMEOUT", "500ms")
        .start();
    let addr = sidecar.addr;
    let (closed_after, sent) = blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut sent = 0;
        for byte in head.iter().cycle() {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            sent += 1;
            // The probe for the close: a read that returns at once once
            // the sidecar has closed.
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut buf = [0u8; 512];
            match stream.read(&mut buf) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            assert!(start.elapsed() < DEADLINE, "never cut off");
        }
        (start.elapsed(), sent)
    })
    .await;
    assert!(
        closed_after >= Duration::from_millis(450) && closed_after < Duration::from_secs(5),
        "closed after {closed_after:?} ({sent} bytes)"
    );
    assert_eq!(app.hits(), 0);
}

/// A client that stops in the middle of a request body: 408 once it has
/// paused for server.idle_timeout, the app's connection is let go, and the
/// sidecar serves on.
#[tokio::test]
async fn a_stalled_request_body_gets_408_after_the_pause_limit() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__IDLE_TIMEOUT", "500ms")
        .start();
    let addr = sidecar.addr;
    let (response, took) = blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let start = Instant::now();
        stream
            .write_all(b"POST /count HTTP/1.1\r\nHost: h\r\nx-request-id: stall-1\r\nContent-Length: 1000\r\n\r\n0123456789")
            .unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
    })
    .await;
    assert_eq!(status_of(&response), 408, "{response}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let line = sidecar.summary_for("stall-1");
    assert_eq!(line["Fields"]["errno"], 408, "{line}");
    assert!(
        line["Fields"]["msg"]
            .as_str()
            .unwrap()
            .contains("no request body bytes for 500ms"),
        "{line}"
    );
    // A body that keeps coming, however slowly, is not cut off.
    let addr = sidecar.addr;
    let response = blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
            .write_all(b"POST /count HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
            .unwrap();
        for chunk in [b"ab", b"cd", b"ef", b"gh"] {
            std::thread::sleep(Duration::from_millis(300));
            stream.write_all(chunk).unwrap();
        }
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.ends_with("{\"bytes\":8}"), "{response}");
}

/// HTTP/2 frames written by hand, so the test controls exactly what goes
/// on the wire (a real client library would refuse to misbehave).
mod h2frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[])
    }

    /// GET `path` (HPACK: indexed :method GET, :scheme http, literal
    /// :path and :authority without indexing), END_STREAM | END_HEADERS.
    pub fn get_frame(stream: u32, path: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86];
        block.push(0x04);
        block.push(path.len() as u8);
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 0x01, b'h']);
        frame(0x1, 0x5, stream, &block)
    }

    pub fn rst(stream: u32) -> Vec<u8> {
        // CANCEL
        frame(0x3, 0, stream, &8u32.to_be_bytes())
    }

    /// Reads frames until the connection closes or `limit` passes; returns
    /// (kind, stream, first 4 payload bytes as u32) of each.
    pub fn read_all(
        stream: &mut std::net::TcpStream,
        limit: std::time::Duration,
    ) -> Vec<(u8, u32, u32)> {
        use std::io::Read;
        let end = std::time::Instant::now() + limit;
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        let mut chunk = [0u8; 65536];
        while std::time::Instant::now() < end {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            while buf.len() >= 9 {
                let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let word = if len >= 8 && buf[3] == 0x7 {
                    // GOAWAY: the error code follows the last stream id.
                    u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]])
                } else if len >= 4 {
                    u32::from_be_bytes([buf[9], buf[10], buf[11], buf[12]])
                } else {
                    0
                };
                frames.push((buf[3], id, word));
                buf.drain(..9 + len);
            }
        }
        frames
    }
}

/// Rapid reset (CVE-2023-44487): a client opening and cancelling streams
/// as fast as it can gets GOAWAY and loses its connection; the app sees a
/// bounded number of those requests and other clients are served.
#[tokio::test]
async fn h2_rapid_reset_is_cut_off() {
    use h2frames::*;
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let addr = sidecar.addr;
    let (frames, hits_during) = {
        let app_hits = app.hits.clone();
        blocking(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            let mut out = PREFACE.to_vec();
            out.extend(settings());
            for i in 0..10_000u32 {
                let id = 2 * i + 1;
                out.extend(get_frame(id, "/slow/200"));
                out.extend(rst(id));
            }
            // The sidecar may close before all of it is written.
            let _ = stream.write_all(&out);
            let frames = read_all(&mut stream, Duration::from_secs(10));
            (frames, app_hits.load(Ordering::SeqCst))
        })
        .await
    };
    let goaway = frames.iter().find(|f| f.0 == 0x7);
    eprintln!(
        "rapid reset: 10000 streams opened and cancelled, {hits_during} reached the app, GOAWAY {goaway:?}"
    );
    // ENHANCE_YOUR_CALM (0xb)
    assert_eq!(
        goaway.map(|f| f.2),
        Some(0xb),
        "{:?}",
        &frames[..frames.len().min(20)]
    );
    assert!(
        hits_during < 1_000,
        "{hits_during} requests reached the app"
    );
    assert_eq!(get(&sidecar.url("/after"), &[]).await.status, 200);
}

/// A stream flood: more concurrent streams than allowed are refused
/// (REFUSED_STREAM), the allowed ones are served.
#[tokio::test]
async fn h2_streams_beyond_the_concurrency_limit_are_refused() {
    use h2frames::*;
    let app = Upstream::start();
    let sidecar = sidecar(&app);
    let addr = sidecar.addr;
    let frames = blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut out = PREFACE.to_vec();
        out.extend(settings());
        for i in 0..1_000u32 {
            out.extend(get_frame(2 * i + 1, "/slow/300"));
        }
        stream.write_all(&out).unwrap();
        read_all(&mut stream, Duration::from_secs(8))
    })
    .await;
    let refused = frames.iter().filter(|f| f.0 == 0x3 && f.2 == 0x7).count();
    let answered = frames
        .iter()
        .filter(|f| f.0 == 0x1)
        .map(|f| f.1)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    eprintln!("stream flood: 1000 streams, {answered} answered, {refused} refused");
    assert!(refused > 0, "no stream was refused");
    assert!(answered > 0, "no stream was answered");
    assert_eq!(
        refused + answered,
        1_000,
        "refused {refused}, answered {answered}"
    );
    assert!(app.hits() <= 1_000);
    assert_eq!(get(&sidecar.url("/after"), &[]).await.status, 200);
}

/// A flood of reports that all differ (no deduplication helps): every one
/// gets 204 or 429, never an error, and every accepted one is either stored
/// or counted as dropped.
#[tokio::test]
async fn a_flood_of_varied_reports_is_answered_and_accounted_for() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_REPORTS__RATE_PER_CLIENT", "2000")
        .env("DOCKERFLOW_REPORTS__BURST_PER_CLIENT", "500")
        .env("DOCKERFLOW_REPORTS__QUEUE", "300")
        .start();
    let accepted = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let url = sidecar.url("/__cspreport__");
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (accepted, limited, url) = (accepted.clone(), limited.clone(), url.clone());
            tokio::spawn(async move {
                let client = common::keep_alive_client();
                for i in 0..400usize {
                    let n = t * 1000 + i;
                    let (kind, body) = varied_report(n);
                    let req = http::Request::post(&url)
                        .header("content-type", kind)
                        .header("user-agent", format!("agent/{n}"))
                        .body(http_body_util::Full::new(Bytes::from(body)))
                        .unwrap();
                    let resp = client.request(req).await.unwrap();
                    match resp.status().as_u16() {
                        204 => accepted.fetch_add(1, Ordering::SeqCst),
                        429 => limited.fetch_add(1, Ordering::SeqCst),
                        other => panic!("report {n}: {other}"),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let accepted = accepted.load(Ordering::SeqCst);
    eprintln!(
        "report flood: 3200 varied reports, {accepted} accepted, {} rate-limited",
        limited.load(Ordering::SeqCst)
    );
    assert_eq!(accepted + limited.load(Ordering::SeqCst), 3_200);
    assert!(accepted > 500, "{accepted}");
    // Stored + folded + noise + dropped = accepted reports (a batch may
    // hold several; each of ours holds one).
    let end = Instant::now() + DEADLINE;
    loop {
        let reply = get(&sidecar.admin_url("/metrics"), &[]).await;
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        let counted: f64 = text
            .lines()
            .filter(|l| l.starts_with("dockerflow_sidecar_reports_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if counted as usize == accepted {
            break;
        }
        assert!(
            Instant::now() < end,
            "{counted} counted of {accepted} accepted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A report body with fields that vary with `n`: type, directive, URLs
/// (some with query strings and control characters), sizes.
fn varied_report(n: usize) -> (&'static str, String) {
    let pad = "x".repeat(n % 3000);
    match n % 4 {
        0 => (
            "application/csp-report",
            format!(
                r#"{{"csp-report":{{"document-uri":"https://site{n}.example/p?token={n}","violated-directive":"script-src-elem","blocked-uri":"https://cdn.example/{n}.js\u0007","line-number":{n},"original-policy":"{pad}"}}}}"#
            ),
        ),
        1 => (
            "application/reports+json",
            format!(
                r#"[{{"type":"csp-violation","age":{n},"url":"https://a.example/{n}","user_agent":"ua","body":{{"documentURL":"https://a.example/{n}","effectiveDirective":"img-src","blockedURL":"https://img{n}.example/x.png","disposition":"report","sample":"{pad}"}}}}]"#
            ),
        ),
        2 => (
            "application/reports+json",
            format!(
                r#"[{{"type":"network-error","age":1,"url":"https://n.example/{n}","body":{{"type":"tcp.timed_out","phase":"connection","elapsed_time":{n},"status_code":0,"server_ip":"10.0.0.{}","sampling_fraction":1.0}}}}]"#,
                n % 255
            ),
        ),
        _ => (
            "application/reports+json",
            format!(
                r#"[{{"type":"deprecation","age":0,"url":"https://d.example/{n}","body":{{"id":"feature{n}","message":"{pad}","sourceFile":"https://d.example/app.js","lineNumber":{n}}}}}]"#
            ),
        ),
    }
}
