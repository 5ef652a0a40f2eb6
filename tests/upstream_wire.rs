//! The proxy's own HTTP/1.1 client (src/h1.rs) against an app that writes
//! exact bytes: every way RFC 9112 delimits a response body, interim
//! responses, malformed and conflicting framing, early answers to uploads,
//! and when an upstream connection may carry the next request.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{get, request, Sidecar, SidecarBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An app that answers each request with the raw response its path names,
/// with `x-conn: N` (its connection's number) after the status line, and
/// records each request head it read.
struct WireApp {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

/// The raw response for `path`, `None` for a path the app does not know.
fn script(path: &str) -> Option<&'static [u8]> {
    Some(match path {
        "/plain" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "/trailers" => b"HTTP/1.1 200 OK\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-sum: 42\r\n\r\n",
        "/interim" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nat last",
        "/until-close" => b"HTTP/1.1 200 OK\r\n\r\nall of it, until the end",
        "/conflicting-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "/bad-length" => b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        "/te-and-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "/bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "/garbage" => b"SPDY/9 maybe\r\n\r\n",
        "/http10" => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        "/extra" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/hint-then-close" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        "/early" => b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo long",
        "/http10-until-close" => b"HTTP/1.0 200 OK\r\n\r\nan old app",
        "/head-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "/trailers-mixed" => b"HTTP/1.1 200 OK\r\nTrailer: x-ok, set-cookie\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-ok: 1\r\nx-undeclared: 2\r\nset-cookie: s=3\r\ncontent-length: 99\r\n\r\n",
        _ => return None,
    })
}

impl WireApp {
    fn start() -> WireApp {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let addr = std.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        common::in_background(async move {
            let listener = TcpListener::from_std(std).unwrap();
            let count = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, n, log.clone()));
            }
        });
        WireApp { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Serves one connection: reads a head (and a Content-Length body, except
/// for `/early`, which answers at once and stops reading), writes the
/// scripted response, and goes on while the script keeps the connection.
async fn serve(mut stream: TcpStream, conn: usize, log: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let dribble = head.to_ascii_lowercase().contains("\r\nx-dribble: 1\r\n");
        log.lock().unwrap().push(head);
        if path == "/echo-stream" {
            // Answers at once, then echoes the upload as it reads it, one
            // chunk per read, and ends after the last byte.
            let reply =
                format!("HTTP/1.1 200 OK\r\nx-conn: {conn}\r\nTransfer-Encoding: chunked\r\n\r\n");
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            let mut left = length;
            while left > 0 {
                if buf.is_empty() {
                    let mut chunk = [0u8; 65536];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let n = buf.len().min(left);
                let mut out = format!("{n:x}\r\n").into_bytes();
                out.extend(buf.drain(..n));
                out.extend_from_slice(b"\r\n");
                left -= n;
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
            if stream.write_all(b"0\r\n\r\n").await.is_err() {
                return;
            }
            continue;
        }
        if path != "/early" {
            while buf.len() < length {
                let mut chunk = [0u8; 65536];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
        }
        let Some(raw) = script(&path) else {
            return;
        };
        // x-conn goes right after the status line of the final response.
        let text = raw.to_vec();
        let at = text
            .windows(8)
            .rposition(|w| w == b"HTTP/1.1" || w == b"HTTP/1.0")
            .unwrap();
        let line_end = at + text[at..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        let mut out = text[..line_end].to_vec();
        out.extend_from_slice(format!("x-conn: {conn}\r\n").as_bytes());
        out.extend_from_slice(&text[line_end..]);
        // `x-dribble: 1`: one byte per write (TCP_NODELAY: one segment
        // each, paced 50 µs apart), so the sidecar sees the partial states of
        // the response.
        if dribble {
            let _ = stream.set_nodelay(true);
            for byte in &out {
                if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_micros(50)).await;
            }
        } else if stream.write_all(&out).await.is_err() {
            return;
        }
        if matches!(
            path.as_str(),
            "/until-close"
                | "/close"
                | "/http10"
                | "/short"
                | "/early"
                | "/hint-then-close"
                | "/http10-until-close"
        ) {
            let _ = stream.shutdown().await;
            // Keep the socket until the peer is done, so the early answer
            // is not lost to a reset.
            let mut sink = [0u8; 65536];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
    }
}

/// One worker: these tests follow requests over the app connections of one
/// pool (each worker has its own, and a new client connection may go to
/// either worker).
fn sidecar(app: &WireApp) -> Sidecar {
    SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "1")
        .start()
}

/// The app connection a response came on.
fn conn_of(reply: &common::Reply) -> &str {
    reply.header("x-conn").expect("x-conn from the app")
}

#[tokio::test]
async fn every_body_framing_reaches_the_client_and_says_whether_the_connection_is_reused() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let first = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!((first.status, &first.body[..]), (200, &b"ok"[..]));

    // Chunked, with an extension: decoded, and the connection carries on.
    let chunked = get(&sidecar.url("/chunked"), &[]).await;
    assert_eq!(
        (chunked.status, &chunked.body[..]),
        (200, &b"hello world"[..])
    );
    assert_eq!(
        conn_of(&chunked),
        conn_of(&first),
        "reused after a Content-Length body"
    );
    let after = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(
        conn_of(&after),
        conn_of(&first),
        "reused after a chunked body"
    );

    // 100 Continue and 103 Early Hints are skipped; the final answer counts.
    let interim = get(&sidecar.url("/interim"), &[]).await;
    assert_eq!((interim.status, &interim.body[..]), (200, &b"at last"[..]));
    assert_eq!(conn_of(&interim), conn_of(&first));

    // 204 has no body, whatever follows on the connection.
    let none = get(&sidecar.url("/no-content"), &[]).await;
    assert_eq!((none.status, none.body.len()), (204, 0));
    assert_eq!(conn_of(&none), conn_of(&first), "reused after a 204");

    // HEAD: the length describes a body that is not sent.
    let head = request("HEAD", &sidecar.url("/head"), &[], Bytes::new()).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(head.header("content-length"), Some("1000"));
    let after_head = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(conn_of(&after_head), conn_of(&first), "reused after HEAD");

    // Delimited by the end of the connection: all of it, then a new one.
    let until_close = get(&sidecar.url("/until-close"), &[]).await;
    assert_eq!(
        (until_close.status, &until_close.body[..]),
        (200, &b"all of it, until the end"[..])
    );
    let next = get(&sidecar.url("/plain"), &[]).await;
    assert_ne!(
        conn_of(&next),
        conn_of(&until_close),
        "not reused after a close-delimited body"
    );

    // Connection: close, HTTP/1.0, and bytes past the body: never reused.
    for path in ["/close", "/http10", "/extra"] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert_eq!((reply.status, &reply.body[..]), (200, &b"ok"[..]), "{path}");
        let next = get(&sidecar.url("/plain"), &[]).await;
        assert_ne!(
            conn_of(&next),
            conn_of(&reply),
            "{path}: connection not reused"
        );
    }
}

#[tokio::test]
async fn response_trailers_are_passed_to_a_client_that_accepts_them() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let raw = common::raw(
        sidecar.addr,
        b"GET /trailers HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    );
    let lower = raw.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{raw}");
    assert!(lower.contains("transfer-encoding: chunked"), "{raw}");
    assert!(lower.contains("\r\n0\r\nx-sum: 42\r\n\r\n"), "{raw}");
}

/// Only trailers the response declared in `Trailer` are passed on, and none
/// that belongs in a head (as hyper's server did).
#[tokio::test]
async fn only_declared_trailers_that_may_be_trailers_are_passed_on() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let raw = common::raw(
        sidecar.addr,
        b"GET /trailers-mixed HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    );
    let lower = raw.to_ascii_lowercase();
    // The whole body and trailer section, exactly: the undeclared field and
    // the declared but forbidden `set-cookie` (and the `content-length`) are
    // gone. (Searching the whole response for "99" matched request ids.)
    let body = &lower[lower.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(body, "2\r\nok\r\n0\r\nx-ok: 1\r\n\r\n", "{raw}");
}

/// An HTTP/1.0 client gets an HTTP/1.0 response, delimited by the close
/// when its length is not known (chunked means nothing to it), whatever
/// version the app spoke; a HEAD response gets no length made up.
#[tokio::test]
async fn http10_clients_get_close_delimited_bodies_and_head_gets_no_made_up_length() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    for path in ["/chunked", "/http10-until-close"] {
        let raw = common::raw(
            sidecar.addr,
            format!("GET {path} HTTP/1.0\r\nHost: h\r\n\r\n").as_bytes(),
        );
        let lower = raw.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.0 200 ok\r\n"), "{path}: {raw}");
        assert!(!lower.contains("transfer-encoding"), "{path}: {raw}");
        let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
        let expected = if path == "/chunked" {
            "hello world"
        } else {
            "an old app"
        };
        assert_eq!(body, expected, "{path}");
    }
    let raw = common::raw(
        sidecar.addr,
        b"HEAD /head-chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    let lower = raw.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{raw}");
    assert!(!lower.contains("content-length"), "{raw}");
    assert!(
        raw.ends_with("\r\n\r\n"),
        "a HEAD response has no body: {raw}"
    );
}

#[tokio::test]
async fn malformed_or_conflicting_framing_is_a_502_and_never_reused() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    for path in ["/conflicting-lengths", "/bad-length", "/garbage"] {
        let reply = get(&sidecar.url(path), &[]).await;
        assert_eq!(reply.status, 502, "{path}: {:?}", reply.body);
        assert!(
            reply.header("x-conn").is_none(),
            "{path}: the app's head is not relayed"
        );
    }
    sidecar.stdout.wait_for("the malformed-length line", |l| {
        l.contains("malformed response from the app: invalid Content-Length")
    });

    // Both Transfer-Encoding and Content-Length: chunked wins (RFC 9112
    // §6.3), the length is dropped, and the connection is not trusted again.
    let both = get(&sidecar.url("/te-and-cl"), &[]).await;
    assert_eq!((both.status, &both.body[..]), (200, &b"ok"[..]));
    assert_ne!(both.header("content-length"), Some("100"));
    let next = get(&sidecar.url("/plain"), &[]).await;
    assert_ne!(conn_of(&next), conn_of(&both));
}

#[tokio::test]
async fn a_head_larger_than_64_kib_is_a_502() {
    // A server that sends an endless header section.
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    let addr = std.local_addr().unwrap();
    common::in_background(async move {
        let listener = TcpListener::from_std(std).unwrap();
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
                let line = format!("x-filler: {}\r\n", "a".repeat(1000));
                for _ in 0..200 {
                    if stream.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let sidecar = SidecarBuilder::new(&format!("http://{addr}")).start();
    let reply = get(&sidecar.url("/"), &[]).await;
    assert_eq!(reply.status, 502);
    sidecar.stdout.wait_for("the long-head line", |l| {
        l.contains("response head longer than 64 KiB")
    });
}

#[tokio::test]
async fn a_body_cut_short_or_badly_chunked_fails_the_client_response_and_its_line() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    for (path, why) in [
        ("/short", "in the middle of the response body"),
        ("/bad-chunk", "invalid chunk size line"),
    ] {
        let raw = common::raw(
            sidecar.addr,
            format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
        );
        // What arrived went out, then the connection is cut: never a
        // whole response. A bad first chunk leaves nothing to send: hyper
        // drops the buffered head with the connection.
        assert!(
            raw.starts_with("HTTP/1.1 200") || (path == "/bad-chunk" && raw.is_empty()),
            "{path}: {raw}"
        );
        assert!(!raw.ends_with("0\r\n\r\n"), "{path}: {raw:?}");
        if path == "/short" {
            assert!(raw.contains("content-length: 100\r\n"), "{raw}");
            assert!(raw.ends_with("\r\n\r\nonly this"), "{raw:?}");
        }
        sidecar.stdout.wait_for(path, |l| {
            l.contains(&format!("\"path\":\"{path}\"")) && l.contains(why)
        });
    }
    // The next request gets a healthy connection.
    let next = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(next.status, 200);
}

#[tokio::test]
async fn an_app_that_answers_an_upload_early_is_relayed_at_once() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    // 16 MiB: far more than the socket buffers hold, so the sidecar would
    // block on it if it waited for the body to go before reading. The
    // client writes it from a thread of its own and reads meanwhile (the
    // sidecar closes after answering, so a client that only reads after
    // writing could lose the answer to the reset).
    let mut stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let size = 16 << 20;
    std::thread::spawn(move || {
        use std::io::Write;
        let head = format!("POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: {size}\r\n\r\n");
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&vec![b'x'; size]);
    });
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"too long") {
        use std::io::Read;
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&reply)
        );
        reply.push(byte[0]);
    }
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    let early_conn = reply
        .lines()
        .find_map(|l| l.strip_prefix("x-conn: "))
        .unwrap()
        .to_owned();
    let next = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(next.status, 200);
    assert_ne!(
        conn_of(&next),
        early_conn,
        "the connection of an unfinished upload is not reused"
    );
}

#[tokio::test]
async fn requests_are_framed_by_the_sidecar() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let posted = request("POST", &sidecar.url("/plain"), &[], "twelve bytes").await;
    assert_eq!(posted.status, 200);
    let empty = request(
        "POST",
        &sidecar.url("/plain"),
        &[("content-length", "0")],
        "",
    )
    .await;
    assert_eq!(empty.status, 200);
    let got = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(got.status, 200);
    let heads = app.heads();
    let lower: Vec<String> = heads.iter().map(|h| h.to_ascii_lowercase()).collect();
    assert!(
        lower[0].starts_with("post /plain http/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert_eq!(
        lower[0].matches("content-length: 12\r\n").count(),
        1,
        "{}",
        heads[0]
    );
    assert!(lower[1].contains("content-length: 0\r\n"), "{}", heads[1]);
    assert!(!lower[2].contains("content-length"), "{}", heads[2]);
    assert!(!lower[2].contains("transfer-encoding"), "{}", heads[2]);
}

#[tokio::test]
async fn a_response_that_arrives_one_byte_at_a_time_is_read_the_same() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let dribble = [("x-dribble", "1")];
    for (method, path, status, body) in [
        ("GET", "/plain", 200, &b"ok"[..]),
        ("GET", "/chunked", 200, &b"hello world"[..]),
        ("GET", "/interim", 200, &b"at last"[..]),
        ("GET", "/no-content", 204, &b""[..]),
        ("HEAD", "/head", 200, &b""[..]),
        ("GET", "/until-close", 200, &b"all of it, until the end"[..]),
    ] {
        let reply = request(method, &sidecar.url(path), &dribble, Bytes::new()).await;
        assert_eq!(
            (reply.status, &reply.body[..]),
            (status, body),
            "{method} {path}"
        );
    }
    // The chunked response again, with its trailers.
    let raw = common::raw(
        sidecar.addr,
        b"GET /trailers HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nx-dribble: 1\r\nConnection: close\r\n\r\n",
    );
    assert!(
        raw.to_ascii_lowercase()
            .contains("\r\n0\r\nx-sum: 42\r\n\r\n"),
        "{raw}"
    );
    // A connection that carried dribbled responses to their ends is reused.
    let first = request("GET", &sidecar.url("/plain"), &dribble, Bytes::new()).await;
    let second = request("GET", &sidecar.url("/chunked"), &dribble, Bytes::new()).await;
    let third = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(conn_of(&first), conn_of(&second));
    assert_eq!(conn_of(&second), conn_of(&third));
}

#[tokio::test]
async fn an_app_that_streams_its_answer_while_reading_the_upload_gets_all_of_it() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    // 4 MiB: the app answers after the head, so the sidecar must keep
    // sending the upload while it relays the answer.
    let upload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let reply = request("POST", &sidecar.url("/echo-stream"), &[], upload.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), upload.len());
    assert!(reply.body[..] == upload[..], "the echo is the upload");
    // Both messages ended: the connection carries the next request.
    let next = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(conn_of(&next), conn_of(&reply));
}

#[tokio::test]
async fn a_request_whose_response_had_begun_is_never_sent_again() {
    let app = WireApp::start();
    let sidecar = sidecar(&app);
    let first = get(&sidecar.url("/plain"), &[]).await;
    assert_eq!(first.status, 200);
    // On the reused connection, the app sends an interim response, then
    // closes: a GET without a body, but its response had begun.
    let reply = get(&sidecar.url("/hint-then-close"), &[]).await;
    assert_eq!(reply.status, 502);
    let sent = app
        .heads()
        .iter()
        .filter(|h| h.starts_with("GET /hint-then-close "))
        .count();
    assert_eq!(sent, 1, "sent once: {:?}", app.heads());
}
