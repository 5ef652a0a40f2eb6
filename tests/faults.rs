//! Issue 10, faults: an app that refuses, resets, closes keep-alive
//! connections under a request, goes away and comes back; SIGTERM under
//! steady load; SIGKILL while reports are written; a full disk under the
//! state file; heartbeat dependencies that hang and flap. Each case checks
//! what the client gets, the summary line and what the sidecar does next.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, request, Sidecar, SidecarBuilder, Upstream, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted app does with the `n`th request (from 0) on a connection.
#[derive(Clone, Copy)]
enum Act {
    /// `200 ok`, keep-alive.
    Answer,
    /// Reads the whole request, then closes without a word (an app whose
    /// keep-alive timeout fired as the request arrived).
    Swallow,
    /// Sends a head promising 100,000 bytes and 1,000 of them, then resets.
    ResetMidBody,
}

/// A hand-written HTTP/1.1 app that records every request it reads, as
/// "METHOD /path body-length", and acts on it by its place on the connection.
struct Scripted {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    /// Bumped to close every open connection (an app restarting).
    restarts: tokio::sync::watch::Sender<u64>,
}

impl Scripted {
    fn start(script: fn(usize) -> Act) -> Scripted {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Scripted::serve(std, script)
    }

    /// Serves on `listener` (a port held until now).
    fn serve(listener: std::net::TcpListener, script: fn(usize) -> Act) -> Scripted {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (restarts, restarted) = tokio::sync::watch::channel(0);
        let (log, count) = (seen.clone(), accepted.clone());
        common::in_background(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut restarted = restarted.clone();
                restarted.mark_unchanged();
                let conn = connection(stream, script, log.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = restarted.changed() => {}
                    }
                });
            }
        });
        Scripted {
            addr,
            seen,
            accepted,
            restarts,
        }
    }

    /// Closes every connection open now, as an app that restarts does.
    fn restart(&self) {
        self.restarts.send_modify(|n| *n += 1);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn connection(mut stream: TcpStream, script: fn(usize) -> Act, log: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    for n in 0.. {
        let Some((line, body)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        log.lock().unwrap().push(format!("{line} {}", body));
        match script(n) {
            Act::Answer => {
                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(reply).await.is_err() {
                    return;
                }
            }
            Act::Swallow => return,
            Act::ResetMidBody => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n";
                let _ = stream.write_all(head).await;
                let _ = stream.write_all(&[b'x'; 1000]).await;
                let _ = stream.flush().await;
                // RST instead of FIN.
                #[allow(deprecated)]
                stream.set_linger(Some(Duration::ZERO)).unwrap();
                return;
            }
        }
    }
}

/// Reads one request: "METHOD /path" and its body length (Content-Length
/// bodies only, which is all the sidecar sends for these tests).
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..end + length);
    let mut words = head.split(' ');
    let line = format!("{} {}", words.next()?, words.next()?);
    Some((line, length))
}

async fn send(sidecar: &Sidecar, method: &str, path: &str, body: &'static str, rid: &str) -> u16 {
    let url = sidecar.url(path);
    request(
        method,
        &url,
        &[("x-request-id", rid)],
        Bytes::from_static(body.as_bytes()),
    )
    .await
    .status
}

#[tokio::test]
async fn a_keep_alive_connection_closed_under_a_request_retries_only_idempotent_bodiless_requests()
{
    // Every connection answers its first request and swallows its second.
    let app = Scripted::start(|n| if n == 0 { Act::Answer } else { Act::Swallow });
    // One worker, so one pool: each request (on a new client connection)
    // finds the connection the one before left.
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "1")
        .start();

    assert_eq!(send(&sidecar, "GET", "/1", "", "r1").await, 200);
    // On the pooled connection, swallowed; sent again on a new one.
    assert_eq!(send(&sidecar, "GET", "/2", "", "r2").await, 200);
    // A POST may have reached the app: never sent twice.
    assert_eq!(send(&sidecar, "POST", "/3", "x=1", "r3").await, 502);
    assert_eq!(send(&sidecar, "GET", "/4", "", "r4").await, 200);
    // DELETE is idempotent: sent again.
    assert_eq!(send(&sidecar, "DELETE", "/5", "", "r5").await, 200);
    // PUT is idempotent, but its body was streamed through: not again.
    assert_eq!(send(&sidecar, "PUT", "/6", "new", "r6").await, 502);

    assert_eq!(
        app.seen(),
        [
            "GET /1 0",
            "GET /2 0",
            "GET /2 0",
            "POST /3 3",
            "GET /4 0",
            "DELETE /5 0",
            "DELETE /5 0",
            "PUT /6 3"
        ]
    );
    assert_eq!(app.accepted.load(Ordering::SeqCst), 4);

    for (rid, code) in [("r1", 200), ("r2", 200), ("r5", 200)] {
        let line = sidecar.summary_for(rid);
        assert_eq!(line["Fields"]["code"], code, "{line}");
        assert_eq!(line["Fields"]["errno"], 0, "{line}");
    }
    for rid in ["r3", "r6"] {
        let line = sidecar.summary_for(rid);
        assert_eq!(line["Fields"]["code"], 502, "{line}");
        assert_eq!(line["Fields"]["errno"], 502, "{line}");
        let msg = line["Fields"]["msg"].as_str().unwrap();
        assert!(msg.starts_with("upstream failed: "), "{line}");
    }
}

#[tokio::test]
async fn a_reset_mid_body_aborts_the_client_connection_and_is_logged() {
    let app = Scripted::start(|_| Act::ResetMidBody);
    let sidecar = SidecarBuilder::new(&app.url()).start();

    // The head went out before the reset: the client sees 200, then a body
    // that ends early with an error, never a short body passed off as whole.
    for (round, rid) in ["reset-1", "reset-2"].into_iter().enumerate() {
        let addr = sidecar.addr;
        let request = format!(
            "GET /big HTTP/1.1\r\nHost: h\r\nx-request-id: {rid}\r\nConnection: close\r\n\r\n"
        );
        let raw = tokio::task::spawn_blocking(move || common::raw(addr, request.as_bytes()))
            .await
            .unwrap();
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(raw.contains("content-length: 100000"), "{raw}");
        let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
        assert!(body.len() >= 1000 && body.len() < 100_000, "{}", body.len());

        let line = sidecar.summary_for(rid);
        assert_eq!(line["Fields"]["code"], 200, "{line}");
        assert_eq!(line["Fields"]["errno"], 200, "{line}");
        let msg = line["Fields"]["msg"].as_str().unwrap();
        assert!(msg.starts_with("upstream response body failed"), "{line}");
        // The broken connection is not reused: each request has its own.
        assert_eq!(app.accepted.load(Ordering::SeqCst), round + 1);
    }
}

#[tokio::test]
async fn an_app_that_is_down_gives_502_and_the_first_request_after_it_is_back_succeeds() {
    let port = common::closed_port();
    let url = format!("http://127.0.0.1:{}", port.port);
    let sidecar = SidecarBuilder::new(&url).start();

    for i in 0..3 {
        let rid = format!("down-{i}");
        assert_eq!(send(&sidecar, "GET", "/", "", &rid).await, 502);
        let line = sidecar.summary_for(&rid);
        assert_eq!(line["Fields"]["errno"], 502, "{line}");
        let msg = line["Fields"]["msg"].as_str().unwrap();
        assert!(msg.starts_with("upstream unreachable"), "{line}");
        assert!(msg.contains("refused"), "{line}");
    }

    // The app comes back on the same port: the very next request passes.
    let app = Scripted::serve(port.listen(), |_| Act::Answer);
    assert_eq!(send(&sidecar, "GET", "/", "", "back-1").await, 200);
    assert_eq!(app.seen(), ["GET / 0"]);
}

#[tokio::test]
async fn an_app_restarting_under_pooled_connections_costs_no_request() {
    let app = Scripted::start(|_| Act::Answer);
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_UPSTREAM__POOL_IDLE_TIMEOUT", "1m")
        .start();
    for round in 0..20 {
        // A pooled connection, then the app closes it as the next request
        // arrives, at whatever point of it the race falls.
        assert_eq!(
            send(&sidecar, "GET", "/warm", "", &format!("warm-{round}")).await,
            200
        );
        app.restart();
        let rid = format!("after-{round}");
        assert_eq!(
            send(&sidecar, "GET", "/after", "", &rid).await,
            200,
            "round {round}"
        );
        assert_eq!(sidecar.summary_for(&rid)["Fields"]["errno"], 0);
    }
    // One connection per round at least was closed and replaced.
    assert!(app.accepted.load(Ordering::SeqCst) >= 20);
}

#[tokio::test]
async fn sigterm_under_steady_load_fails_no_request() {
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        // Longer than the rest of the load: the load balancer would have
        // stopped sending by the end of the drain.
        .shutdown("4s", "5s")
        .start();
    let addr = sidecar.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let closes = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    // 16 keep-alive clients at about 50 req/s each (800 req/s in all).
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (stop, sent, closes, failures) =
                (stop.clone(), sent.clone(), closes.clone(), failures.clone());
            tokio::spawn(async move {
                let client = common::keep_alive_client();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    i += 1;
                    let req = http::Request::get(format!("http://{addr}/load/{c}/{i}"))
                        .header("x-request-id", format!("load-{c}-{i}"))
                        .body(http_body_util::Full::new(Bytes::new()))
                        .unwrap();
                    sent.fetch_add(1, Ordering::SeqCst);
                    match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            if resp
                                .headers()
                                .get("connection")
                                .is_some_and(|v| v == "close")
                            {
                                closes.fetch_add(1, Ordering::SeqCst);
                            }
                            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
                            if status != 200 || body.is_err() {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{c}/{i}: {status} {body:?}"));
                            }
                        }
                        Err(e) => failures.lock().unwrap().push(format!("{c}/{i}: {e:?}")),
                    }
                }
            })
        })
        .collect();

    // SIGTERM once the load is steady; the load goes on for 2 s of the drain.
    wait_until(|| sent.load(Ordering::SeqCst) >= 400).await;
    sidecar.signal(libc::SIGTERM);
    let drain_started = Instant::now();
    sidecar.stdout.wait_for("the drain", |l| {
        l.contains("draining: health routes answer 503")
    });
    assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 503);
    tokio::time::sleep_until((drain_started + Duration::from_secs(2)).into()).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let total = sent.load(Ordering::SeqCst);
    let failed = failures.lock().unwrap().clone();
    eprintln!(
        "sigterm under load: {total} requests, {} failed, {} answered with Connection: close during the drain",
        failed.len(),
        closes.load(Ordering::SeqCst)
    );
    assert!(
        failed.is_empty(),
        "{} of {total} failed: {failed:?}",
        failed.len()
    );
    // Keep-alive connections were told to go during the drain.
    assert!(
        closes.load(Ordering::SeqCst) >= 16,
        "{}",
        closes.load(Ordering::SeqCst)
    );

    assert_eq!(sidecar.wait_exit(), Some(0));
    // One summary line per request, none lost in the shutdown.
    let lines = sidecar
        .summaries()
        .iter()
        .filter(|l| {
            l["Fields"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/load/"))
        })
        .count();
    assert_eq!(lines, total);
    assert_eq!(app.hits(), total);
}

async fn wait_until(cond: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < end,
            "condition not met within the deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A legacy CSP report whose blocked URL makes it distinct, padded to about
/// `size` bytes.
fn csp_report(n: usize, size: usize) -> String {
    let pad = "p".repeat(size.saturating_sub(300));
    format!(
        r#"{{"csp-report":{{"document-uri":"https://example.com/page","violated-directive":"img-src","effective-directive":"img-src","original-policy":"img-src 'self'; report-uri /__cspreport__ {pad}","blocked-uri":"https://cdn{n}.example.net/x.png","disposition":"enforce","status-code":200}}}}"#
    )
}

async fn post_report(sidecar: &Sidecar, n: usize, size: usize) -> u16 {
    common::post_csp_report(sidecar, csp_report(n, size))
        .await
        .status
}

/// Rows in the state file's reports table (read-only, beside the writer).
fn stored_rows(db: &std::path::Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(DEADLINE).unwrap();
    conn.query_row("SELECT count(*) FROM reports", [], |r| r.get(0))
        .unwrap()
}

async fn wait_for_rows(db: &std::path::Path, rows: i64) {
    let end = Instant::now() + DEADLINE;
    loop {
        let now = stored_rows(db);
        if now >= rows {
            return;
        }
        assert!(
            Instant::now() < end,
            "{now} rows stored, waiting for {rows}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric's value from the admin listener.
async fn metric(sidecar: &Sidecar, key: &str) -> f64 {
    let reply = get(&sidecar.admin_url("/metrics"), &[]).await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI and the test machine run as root)"
        );
        Tmpfs(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the filesystem at `dir` until it has no byte left.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // The last partial block.
    while file.write(&block[..512]).is_ok_and(|n| n > 0) {}
    path
}

#[tokio::test]
async fn a_full_disk_under_the_state_file_drops_reports_and_serves_on() {
    let disk = Tmpfs::mount("2m");
    let db = disk.path().join("state.db");
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_STATE__PATH", db.to_str().unwrap())
        .start();
    assert_eq!(post_report(&sidecar, 0, 400).await, 204);
    wait_for_rows(&db, 1).await;

    let filler = fill(disk.path());
    // Reports of 20 kB each: the WAL has to grow for them, and cannot.
    for n in 1..=40 {
        assert_eq!(post_report(&sidecar, n, 20_000).await, 204, "report {n}");
        assert_eq!(get(&sidecar.url("/proxied"), &[]).await.status, 200);
        assert_eq!(get(&sidecar.url("/__lbheartbeat__"), &[]).await.status, 200);
    }
    let dropped = "dockerflow_sidecar_reports_total{outcome=\"dropped\",type=\"csp-violation\"}";
    let end = Instant::now() + DEADLINE;
    while metric(&sidecar, dropped).await < 40.0 {
        assert!(Instant::now() < end, "reports not counted as dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored_rows(&db), 1);
    // Logged as an error once for the interval, not once per report.
    let errors: Vec<String> = sidecar
        .stdout
        .all()
        .into_iter()
        .filter(|l| l.contains("cannot store reports"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("\"Severity\":3"), "{}", errors[0]);
    assert!(errors[0].contains("full"), "{}", errors[0]);

    // Space comes back: the next report is stored.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(post_report(&sidecar, 100, 400).await, 204);
    wait_for_rows(&db, 2).await;
    // Nothing was lost that was not counted: 1 + 1 stored, 40 dropped.
    assert_eq!(metric(&sidecar, dropped).await, 40.0);
}

#[tokio::test]
async fn sigkill_while_reports_are_written_leaves_a_sound_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("dockerflow-sidecar.db");
    let app = Upstream::start();
    let mut sidecar = SidecarBuilder::new(&app.url())
        .workdir(dir.path())
        .env("DOCKERFLOW_REPORTS__RATE_PER_CLIENT", "1000000")
        .env("DOCKERFLOW_REPORTS__BURST_PER_CLIENT", "1000000")
        .start();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = sidecar.addr;
    let posters: Vec<_> = (0..8)
        .map(|t| {
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                let url = format!("http://{addr}/__cspreport__");
                let client = common::keep_alive_client();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let req = http::Request::post(&url)
                        .header("content-type", "application/csp-report")
                        .body(http_body_util::Full::new(Bytes::from(csp_report(
                            t * 1_000_000 + i,
                            1000,
                        ))))
                        .unwrap();
                    match client.request(req).await {
                        Ok(resp) if resp.status() == 204 => {
                            acknowledged.fetch_add(1, Ordering::SeqCst);
                        }
                        // The sidecar is gone.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    wait_for_rows(&db, 500).await;
    sidecar.signal(libc::SIGKILL);
    assert_eq!(sidecar.wait_exit(), None, "killed by a signal");
    stop.store(true, Ordering::SeqCst);
    for poster in posters {
        poster.await.unwrap();
    }

    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let rows = stored_rows(&db);
    let acked = acknowledged.load(Ordering::SeqCst) as i64;
    // At most the 8 requests in flight at the kill were stored and never
    // acknowledged; what was acknowledged and is not stored was still in
    // the writer's queue (the browser's 204 comes before the commit).
    assert!(
        rows >= 500 && rows <= acked + 8,
        "{rows} rows, {acked} acknowledged"
    );
    eprintln!(
        "acknowledged {acked}, stored {rows}, lost in the queue {}",
        (acked - rows).max(0)
    );
    drop(conn);

    // A new process opens the same file and goes on.
    let sidecar = SidecarBuilder::new(&app.url()).workdir(dir.path()).start();
    assert_eq!(post_report(&sidecar, 99_999_999, 400).await, 204);
    wait_for_rows(&db, rows + 1).await;
}

#[tokio::test]
async fn heartbeat_dependencies_that_hang_and_flap_never_hold_the_route_past_its_bound() {
    // Each connection gets the next behaviour in turn: healthy, failing,
    // hanging (accepts, reads, never answers), closing at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    common::in_background(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        for turn in 0usize.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_request(&mut stream, &mut buf).await.is_none() {
                    return;
                }
                let reply: &[u8] = match turn % 4 {
                    0 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    1 => b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\nno",
                    2 => return std::future::pending().await,
                    _ => return,
                };
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[heartbeat]\ntimeout = \"300ms\"\ncache_ttl = \"0s\"\ndetails = \"full\"\n\
             [[heartbeat.checks]]\nname = \"flappy\"\nkind = \"http\"\nurl = \"http://{addr}/\"\n\
             [[heartbeat.checks]]\nname = \"db\"\nkind = \"tcp\"\nurl = \"tcp://{}\"\n",
            app.addr.unwrap()
        ))
        .start();

    let url = sidecar.url("/__heartbeat__");
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..16 {
        // Four polls at once, sixteen times. Every answer comes within the
        // check's 300 ms plus a margin for a loaded machine (here each round
        // takes 300-330 ms; one CI run saw 2.3 s on a machine that ran the
        // whole suite 6-15 times slower than usual). The margin stays below
        // what a regression costs: a hang never ends, and a check that lost
        // its own timeout would wait the 3 s default.
        let started = Instant::now();
        let replies = futures_util::future::join_all((0..4).map(|_| get(&url, &[]))).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2900),
            "round {round} took {took:?}; the bound is 300ms, the default 3s"
        );
        for reply in replies {
            let body = reply.json();
            let flappy = body["details"]["flappy"]["messages"].to_string();
            // The bound that fired is the one configured.
            if flappy.contains("timed out") {
                assert!(flappy.contains("timed out after 300ms"), "{flappy}");
            }
            *statuses
                .entry((reply.status, flappy.contains("timed out")))
                .or_insert(0) += 1;
        }
    }
    // Every behaviour was seen: passing, failing, and timed out.
    assert!(statuses.contains_key(&(200, false)), "{statuses:?}");
    assert!(statuses.contains_key(&(500, false)), "{statuses:?}");
    assert!(statuses.contains_key(&(500, true)), "{statuses:?}");
}

/// Whether a connection to 127.0.0.1:`port` waits for its SYN to be
/// answered (state SYN_SENT in /proc/net/tcp).
fn syn_unanswered(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
    })
}

#[tokio::test]
async fn a_burst_that_fills_the_apps_accept_queue_is_answered_not_502() {
    // An app with room for one connection waiting to be accepted, and one
    // there already: the kernel drops the sidecar's SYN, as for every
    // connection past the backlog in a burst.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let app: std::net::TcpListener = socket.into();
    let addr = app.local_addr().unwrap();
    let _waiting = std::net::TcpStream::connect(addr).unwrap();
    let sidecar = SidecarBuilder::new(&format!("http://{addr}")).start();

    let url = sidecar.url("/x");
    let started = Instant::now();
    let reply = tokio::spawn(async move { get(&url, &[]).await });
    let end = Instant::now() + DEADLINE;
    while !syn_unanswered(addr.port()) {
        assert!(Instant::now() < end, "the sidecar never tried to connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The app catches up: it accepts what waits and answers each request.
    std::thread::spawn(move || {
        for stream in app.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            });
        }
    });
    let reply = reply.await.unwrap();
    // The retransmitted SYN (1 s after the first) got through.
    assert_eq!(
        reply.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(&reply.body[..], b"ok");
    assert!(started.elapsed() >= Duration::from_millis(900));
}
