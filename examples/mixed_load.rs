//! A mixed load generator for `bench/soak.sh` and `bench/drain.sh`: many
//! concurrent client connections (hyper 1 `client::conn::http1`, one task
//! each), every one looping until the duration is over.
//!
//! Kinds of traffic (`--mix proxied=70,health=10,reports=10,ws=10`):
//! - `proxied`: through the sidecar to `examples/bench_upstream.rs`:
//!   `GET /` (200, 1 KiB body), `POST /upload` with 0-16 KiB (200,
//!   `{"bytes":n}`) and `GET /download/<n>` with 1 B-64 KiB (200, n bytes);
//! - `health`: `/__lbheartbeat__` (200, empty), `/__heartbeat__` (200,
//!   `"status": "ok"`) and `/__version__` (200, a JSON object), in turn;
//! - `reports`: browser reports to `--report-path`: legacy CSP reports
//!   (`application/csp-report`) and Reporting API batches of 1-3 reports
//!   (`application/reports+json`) with varying documents, directives and
//!   blocked URLs; 204 is success (what the intake answers);
//! - `ws`: `GET /ws` with `Connection: Upgrade`, `Upgrade: websocket` (and
//!   the WebSocket key and version headers), 101 expected, then
//!   `--ws-echoes` messages echoed through the tunnel spread over
//!   `--ws-hold`, then a clean close (our FIN, the app's FIN back); then the
//!   next tunnel on a new connection.
//!
//! The `ws` weight is the share of connections that are tunnel loops; the
//! other connections pick each request's kind among proxied, health and
//! reports by their weights, on one keep-alive connection.
//!
//! `--rate R` caps HTTP requests (proxied + health + reports) at R per second
//! in total: each HTTP connection has its own schedule (every N/R s, random
//! phase), a late request goes at once and the schedule does not catch up.
//! Without it every connection is closed-loop (next request when the last
//! answer is read). Tunnels are paced by `--ws-hold` only. Latency is from
//! writing the request to reading the whole answer.
//!
//! Connections start staggered over `--ramp` (default: 1 s per 2,500
//! connections, at least 1 s), which counts in `--duration`. The fd limit is
//! the caller's business (`ulimit -n`).
//!
//! Failures are classed: `connect_refused` (nobody listening: no request
//! reached the server), `connect_other` (connect timeout, reset during the
//! handshake), `unsent` (the keep-alive connection closed before hyper wrote
//! the request, twice in a row: one such request is retried on a new
//! connection, as any client does, and counted in `unsent_retried`; a
//! tunnel's upgrade request is not retried) and
//! `in_flight` (the request was written, or may have been: then an error, a
//! timeout, a wrong status or a wrong body).
//!
//! A keep-alive connection the server has closed (`Connection: close` on
//! its last answer, or a FIN while idle) is replaced before the next request
//! and counted in `reconnects_after_server_close`, not as a failure.
//!
//! At the end one JSON line goes to stdout (per kind: attempted, sent, ok,
//! failed by class, the first error messages, latency percentiles; tunnels;
//! rates; failures per second). Exit status 1 if anything failed.
//!
//! Every request carries `X-Request-ID: <rid-prefix>-<kind>-<conn>-<seq>`,
//! so the sidecar's request.summary lines can be counted against it.
//!
//!   mixed_load --target 127.0.0.1:8000 --connections 10000 --duration 60s \
//!       [--rate 5000] [--mix proxied=70,health=10,reports=10,ws=10] \
//!       [--ramp 4s] [--timeout 10s] [--ws-hold 5s] [--ws-echoes 5] \
//!       [--rid-prefix ml] [--report-path /__cspreport__] [--threads N]

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// --- options -------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Proxied = 0,
    Health = 1,
    Reports = 2,
    Ws = 3,
}
const KINDS: [Kind; 4] = [Kind::Proxied, Kind::Health, Kind::Reports, Kind::Ws];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Proxied => "proxied",
            Kind::Health => "health",
            Kind::Reports => "reports",
            Kind::Ws => "ws",
        }
    }
}

struct Options {
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    mix: [u32; 4],
    ramp: Duration,
    timeout: Duration,
    ws_hold: Duration,
    ws_echoes: u32,
    rid_prefix: String,
    report_path: String,
    threads: usize,
}

fn usage(msg: &str) -> ! {
    eprintln!("mixed_load: {msg}");
    eprintln!(
        "usage: mixed_load --target HOST:PORT [--connections N] [--duration 60s] [--rate R] \
         [--mix proxied=70,health=10,reports=10,ws=10] [--ramp 4s] [--timeout 10s] \
         [--ws-hold 5s] [--ws-echoes 5] [--rid-prefix ml] [--report-path /__cspreport__] [--threads N]"
    );
    std::process::exit(2);
}

fn parse_duration(key: &str, v: &str) -> Duration {
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::from_secs_f64(secs);
    }
    humantime::parse_duration(v).unwrap_or_else(|e| usage(&format!("{key}: {e}")))
}

fn parse_options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut target = None;
    let mut o = Options {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        connections: 100,
        duration: Duration::from_secs(10),
        rate: None,
        mix: [70, 10, 10, 10],
        ramp: Duration::ZERO,
        timeout: Duration::from_secs(10),
        ws_hold: Duration::from_secs(5),
        ws_echoes: 5,
        rid_prefix: "ml".to_owned(),
        report_path: "/__cspreport__".to_owned(),
        threads: 0,
    };
    let mut ramp = None;
    let mut i = 0;
    while i < args.len() {
        let key = args[i].as_str();
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                i += 1;
                let v = args
                    .get(i)
                    .unwrap_or_else(|| usage(&format!("{key} needs a value")));
                (key.to_owned(), v.clone())
            }
        };
        i += 1;
        let num = |v: &str| -> f64 {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n >= 0.0)
                .unwrap_or_else(|| usage(&format!("{key}: '{v}' is not a number")))
        };
        match key.as_str() {
            "--target" => {
                target = Some(
                    value
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .unwrap_or_else(|| usage(&format!("--target: cannot resolve '{value}'"))),
                )
            }
            "--connections" | "-c" => o.connections = num(&value) as usize,
            "--duration" | "-d" => o.duration = parse_duration(&key, &value),
            "--rate" | "-r" => o.rate = Some(num(&value)).filter(|r| *r > 0.0),
            "--ramp" => ramp = Some(parse_duration(&key, &value)),
            "--timeout" => o.timeout = parse_duration(&key, &value),
            "--ws-hold" => o.ws_hold = parse_duration(&key, &value),
            "--ws-echoes" => o.ws_echoes = (num(&value) as u32).max(1),
            "--rid-prefix" => o.rid_prefix = value,
            "--report-path" => o.report_path = value,
            "--threads" => o.threads = num(&value) as usize,
            "--mix" => {
                o.mix = [0; 4];
                for part in value.split(',').filter(|p| !p.is_empty()) {
                    let (name, w) = part
                        .split_once('=')
                        .unwrap_or_else(|| usage(&format!("--mix: '{part}' is not kind=weight")));
                    let idx = KINDS
                        .iter()
                        .position(|k| k.name() == name.trim())
                        .unwrap_or_else(|| usage(&format!("--mix: unknown kind '{name}'")));
                    o.mix[idx] = num(w.trim()) as u32;
                }
                if o.mix.iter().sum::<u32>() == 0 {
                    usage("--mix: all weights are 0");
                }
            }
            _ => usage(&format!("unknown option {key}")),
        }
    }
    o.target = target.unwrap_or_else(|| usage("--target is required"));
    if o.connections == 0 {
        usage("--connections must be at least 1");
    }
    o.ramp =
        ramp.unwrap_or_else(|| Duration::from_secs_f64((o.connections as f64 / 2500.0).max(1.0)));
    o
}

// --- statistics -------------------------------------------------------------------

/// Log-linear latency histogram in microseconds (32 sub-buckets per power of
/// two: about 3 % resolution), lock-free.
struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

const SUB: u32 = 32;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..(64 * SUB as usize))
                .map(|_| AtomicU64::new(0))
                .collect(),
            max: AtomicU64::new(0),
        }
    }

    fn index(us: u64) -> usize {
        if us < u64::from(SUB) {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // >= 5
        let sub = (us >> (exp - 5)) & u64::from(SUB - 1);
        ((exp - 4) * SUB) as usize + sub as usize
    }

    /// The middle of bucket `i`, in microseconds.
    fn value(i: usize) -> f64 {
        let i = i as u64;
        if i < u64::from(SUB) {
            return i as f64;
        }
        let exp = i / u64::from(SUB) + 4;
        let sub = i % u64::from(SUB);
        let width = 1u64 << (exp - 5);
        ((u64::from(SUB) + sub) * width) as f64 + width as f64 / 2.0
    }

    fn record(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX >> 2)) as u64;
        self.buckets[Self::index(us)].fetch_add(1, Relaxed);
        self.max.fetch_max(us, Relaxed);
    }

    /// p50, p90, p99, p99.9 and max in milliseconds.
    fn summary(&self) -> Value {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return json!(null);
        }
        let pct = |p: f64| -> f64 {
            let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Histogram::value(i) / 1000.0;
                }
            }
            f64::NAN
        };
        let max = self.max.load(Relaxed) as f64 / 1000.0;
        let pct = |p: f64| pct(p).min(max);
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "count": total,
            "p50": r(pct(50.0)),
            "p90": r(pct(90.0)),
            "p99": r(pct(99.0)),
            "p99_9": r(pct(99.9)),
            "max": r(max),
        })
    }
}

#[derive(Clone, Copy)]
enum Class {
    Refused = 0,
    Connect = 1,
    Unsent = 2,
    InFlight = 3,
}
const CLASS_NAMES: [&str; 4] = ["connect_refused", "connect_other", "unsent", "in_flight"];

#[derive(Default)]
struct KindStats {
    attempted: AtomicU64,
    sent: AtomicU64,
    ok: AtomicU64,
    failed: [AtomicU64; 4],
    unsent_retried: AtomicU64,
}

const MAX_ERRORS: usize = 8;

struct Stats {
    t0: Instant,
    kinds: [KindStats; 4],
    latency: [Histogram; 4],
    echo_latency: Histogram,
    errors: [Mutex<Vec<String>>; 4],
    tunnels_opened: AtomicU64,
    tunnels_closed_clean: AtomicU64,
    echoes_sent: AtomicU64,
    echoes_ok: AtomicU64,
    connections_opened: AtomicU64,
    server_closed: AtomicU64,
    /// In-flight failures of the first request on a new connection.
    in_flight_on_new: AtomicU64,
    open_now: AtomicU64,
    open_peak: AtomicU64,
    /// Per second since t0: ok, then failures by class.
    per_second: Vec<[AtomicU64; 5]>,
    /// Per second since t0: the slowest success (microseconds).
    per_second_max_us: Vec<AtomicU64>,
    /// Milliseconds since t0 of the first and last failure of each class.
    first_fail_ms: [AtomicU64; 4],
    last_fail_ms: [AtomicU64; 4],
    /// Milliseconds since t0 of the last success.
    last_ok_ms: AtomicU64,
}

impl Stats {
    fn new(seconds: usize) -> Stats {
        Stats {
            t0: Instant::now(),
            kinds: Default::default(),
            latency: [
                Histogram::new(),
                Histogram::new(),
                Histogram::new(),
                Histogram::new(),
            ],
            echo_latency: Histogram::new(),
            errors: Default::default(),
            tunnels_opened: AtomicU64::new(0),
            tunnels_closed_clean: AtomicU64::new(0),
            echoes_sent: AtomicU64::new(0),
            echoes_ok: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            server_closed: AtomicU64::new(0),
            in_flight_on_new: AtomicU64::new(0),
            open_now: AtomicU64::new(0),
            open_peak: AtomicU64::new(0),
            per_second: (0..seconds).map(|_| Default::default()).collect(),
            per_second_max_us: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            first_fail_ms: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            last_fail_ms: Default::default(),
            last_ok_ms: AtomicU64::new(0),
        }
    }

    fn second(&self, slot: usize) {
        let s = self.t0.elapsed().as_secs() as usize;
        if let Some(row) = self.per_second.get(s) {
            row[slot].fetch_add(1, Relaxed);
        }
    }

    fn ok(&self, kind: Kind, took: Duration) {
        self.kinds[kind as usize].ok.fetch_add(1, Relaxed);
        self.latency[kind as usize].record(took);
        self.second(0);
        self.last_ok_ms.fetch_max(self.ms(), Relaxed);
        let s = self.t0.elapsed().as_secs() as usize;
        if let Some(max) = self.per_second_max_us.get(s) {
            max.fetch_max(took.as_micros() as u64, Relaxed);
        }
    }

    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn fail(&self, kind: Kind, class: Class, msg: impl FnOnce() -> String) {
        self.kinds[kind as usize].failed[class as usize].fetch_add(1, Relaxed);
        self.second(1 + class as usize);
        let ms = self.ms();
        self.first_fail_ms[class as usize].fetch_min(ms, Relaxed);
        self.last_fail_ms[class as usize].fetch_max(ms, Relaxed);
        let mut errors = self.errors[kind as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if errors.len() < MAX_ERRORS {
            errors.push(format!(
                "{:.3}s {}: {}",
                self.t0.elapsed().as_secs_f64(),
                CLASS_NAMES[class as usize],
                msg()
            ));
        }
    }
}

/// One open TCP connection to the target, counted while it lives.
struct Open(Arc<Stats>);

impl Open {
    fn new(stats: &Arc<Stats>) -> Open {
        stats.connections_opened.fetch_add(1, Relaxed);
        let now = stats.open_now.fetch_add(1, Relaxed) + 1;
        stats.open_peak.fetch_max(now, Relaxed);
        Open(stats.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open_now.fetch_sub(1, Relaxed);
    }
}

// --- connections --------------------------------------------------------------------

type Body = Full<Bytes>;

enum ConnectError {
    Refused(String),
    Other(String),
}

async fn tcp_connect(o: &Options) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(o.timeout, TcpStream::connect(o.target)).await {
        Err(_) => Err(ConnectError::Other(format!(
            "connect timed out after {:?}",
            o.timeout
        ))),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(ConnectError::Refused(format!("connect: {e}")))
        }
        Ok(Err(e)) => Err(ConnectError::Other(format!("connect: {e}"))),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// A new keep-alive HTTP/1.1 connection; its task holds the `Open` count.
/// A keep-alive connection: the sender, the local port (to find the
/// connection in the server's debug log) and how many requests it carried.
struct Conn {
    sender: SendRequest<Body>,
    port: u16,
    used: u32,
}

async fn connect_http(o: &Options, stats: &Arc<Stats>) -> Result<Conn, ConnectError> {
    let stream = tcp_connect(o).await?;
    let port = stream.local_addr().map_or(0, |a| a.port());
    let open = Open::new(stats);
    let (sender, conn) = http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Other(format!("handshake: {e}")))?;
    tokio::spawn(async move {
        let _open = open;
        let _ = conn.await;
    });
    Ok(Conn {
        sender,
        port,
        used: 0,
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

// --- requests ----------------------------------------------------------------------

/// What a correct answer looks like.
enum Expect {
    /// This status and exactly this many body bytes.
    Len(StatusCode, usize),
    /// This status and exactly this body.
    Exact(StatusCode, Bytes),
    /// 200 and a JSON object whose "status" is "ok".
    HeartbeatOk,
    /// 200 and a JSON object.
    JsonObject,
}

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) mixed_load/1";

fn base(method: &str, path: &str, rid: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench.example")
        .header("user-agent", UA)
        .header("x-request-id", rid)
}

fn proxied_request(rid: &str) -> (Request<Body>, Expect) {
    match fastrand::u32(0..10) {
        0..=5 => (
            base("GET", "/", rid).body(Body::default()).unwrap(),
            Expect::Len(StatusCode::OK, 1024),
        ),
        6 | 7 => {
            let n = fastrand::usize(0..=16 * 1024);
            let body = Bytes::from(vec![b'u'; n]);
            (
                base("POST", "/upload", rid)
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(body))
                    .unwrap(),
                Expect::Exact(StatusCode::OK, Bytes::from(format!("{{\"bytes\":{n}}}"))),
            )
        }
        _ => {
            let n = fastrand::usize(1..=64 * 1024);
            (
                base("GET", &format!("/download/{n}"), rid)
                    .body(Body::default())
                    .unwrap(),
                Expect::Len(StatusCode::OK, n),
            )
        }
    }
}

fn health_request(rid: &str, seq: u64) -> (Request<Body>, Expect) {
    let (path, expect) = match seq % 3 {
        0 => ("/__lbheartbeat__", Expect::Len(StatusCode::OK, 0)),
        1 => ("/__heartbeat__", Expect::HeartbeatOk),
        _ => ("/__version__", Expect::JsonObject),
    };
    (
        base("GET", path, rid).body(Body::default()).unwrap(),
        expect,
    )
}

const DIRECTIVES: [&str; 5] = [
    "script-src-elem",
    "style-src-attr",
    "img-src",
    "connect-src",
    "frame-ancestors",
];

fn csp_report(n: u64) -> Value {
    let doc = n % 1000;
    json!({"csp-report": {
        "document-uri": format!("https://app.example/page/{doc}?session=abc{n}"),
        "referrer": "https://app.example/",
        "violated-directive": DIRECTIVES[(n % 5) as usize],
        "effective-directive": DIRECTIVES[(n % 5) as usize],
        "original-policy": "default-src 'self'; script-src 'self'; report-uri /__cspreport__",
        "disposition": if n % 7 == 0 { "report" } else { "enforce" },
        "blocked-uri": format!("https://cdn{}.example/lib.js?v={n}", n % 50),
        "line-number": n % 400,
        "column-number": n % 80,
        "source-file": "https://app.example/static/app.js",
        "status-code": 200,
        "script-sample": ""
    }})
}

fn reporting_api_batch(n: u64) -> Value {
    let count = 1 + n % 3;
    let reports: Vec<Value> = (0..count)
        .map(|i| {
            let m = n.wrapping_mul(31).wrapping_add(i);
            match m % 3 {
                0 => json!({"age": m % 5000, "type": "csp-violation",
                    "url": format!("https://app.example/doc/{}", m % 500), "user_agent": UA,
                    "body": {"blockedURL": format!("https://ads{}.example/x.js", m % 20),
                             "columnNumber": m % 90, "disposition": "enforce",
                             "documentURL": format!("https://app.example/doc/{}?q={m}", m % 500),
                             "effectiveDirective": DIRECTIVES[(m % 5) as usize], "lineNumber": m % 300,
                             "originalPolicy": "default-src 'self'", "referrer": "",
                             "sample": "", "sourceFile": "https://app.example/app.js", "statusCode": 200}}),
                1 => json!({"age": 0, "type": "deprecation",
                    "url": format!("https://app.example/doc/{}", m % 500), "user_agent": UA,
                    "body": {"id": format!("Feature{}", m % 10), "anticipatedRemoval": "2026-12-01",
                             "message": "gone soon", "sourceFile": "https://app.example/app.js",
                             "lineNumber": m % 300, "columnNumber": 4}}),
                _ => json!({"age": 10, "type": "network-error",
                    "url": format!("https://api.example/v1/{}", m % 100), "user_agent": UA,
                    "body": {"elapsed_time": m % 900, "method": "POST", "phase": "connection",
                             "protocol": "h2", "referrer": "https://app.example/", "sampling_fraction": 1.0,
                             "server_ip": "203.0.113.9", "status_code": 0, "type": "tcp.timed_out"}}),
            }
        })
        .collect();
    Value::Array(reports)
}

fn report_request(o: &Options, rid: &str, n: u64) -> (Request<Body>, Expect) {
    let (ct, body) = if n % 5 == 4 {
        ("application/reports+json", reporting_api_batch(n))
    } else {
        ("application/csp-report", csp_report(n))
    };
    (
        base("POST", &o.report_path, rid)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
        Expect::Len(StatusCode::NO_CONTENT, 0),
    )
}

fn check(expect: &Expect, status: StatusCode, body: &Bytes) -> Result<(), String> {
    let preview = || String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    match expect {
        Expect::Len(want, len) => {
            if status != *want || body.len() != *len {
                return Err(format!(
                    "status {status} with {} body bytes, wanted {want} with {len}: {:?}",
                    body.len(),
                    preview()
                ));
            }
        }
        Expect::Exact(want, bytes) => {
            if status != *want || body != bytes {
                return Err(format!(
                    "status {status} body {:?}, wanted {want} {bytes:?}",
                    preview()
                ));
            }
        }
        Expect::HeartbeatOk | Expect::JsonObject => {
            let parsed: Option<Value> = serde_json::from_slice(body).ok();
            let good = status == StatusCode::OK
                && match (expect, &parsed) {
                    (Expect::HeartbeatOk, Some(v)) => v["status"] == "ok",
                    (_, Some(v)) => v.is_object(),
                    _ => false,
                };
            if !good {
                return Err(format!("status {status} body {:?}", preview()));
            }
        }
    }
    Ok(())
}

enum Outcome {
    Ok(Duration),
    /// Never written: the connection closed first. The request comes back.
    Unsent(Box<Request<Body>>, String),
    Failed(String),
}

async fn exchange(
    o: &Options,
    sender: &mut SendRequest<Body>,
    req: Request<Body>,
    expect: &Expect,
) -> Outcome {
    let start = Instant::now();
    let work = async {
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(body) => match check(expect, status, &body.to_bytes()) {
                        Ok(()) => Outcome::Ok(start.elapsed()),
                        Err(e) => Outcome::Failed(e),
                    },
                    Err(e) => Outcome::Failed(format!("reading the body: {}", error_chain(&e))),
                }
            }
            Err(mut e) => match e.take_message() {
                Some(req) => Outcome::Unsent(Box::new(req), error_chain(e.error())),
                None => Outcome::Failed(error_chain(e.error())),
            },
        }
    };
    match tokio::time::timeout(o.timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!("no complete answer within {:?}", o.timeout)),
    }
}

// --- connection loops -------------------------------------------------------------

struct Shared {
    o: Options,
    stats: Arc<Stats>,
    deadline: Instant,
    /// Seconds between two requests of one HTTP connection, when paced.
    interval: Option<Duration>,
    /// Cumulative weights of proxied, health, reports.
    http_weights: [u32; 3],
}

fn pick_http_kind(sh: &Shared) -> Kind {
    let total = sh.http_weights[2];
    let r = fastrand::u32(0..total);
    if r < sh.http_weights[0] {
        Kind::Proxied
    } else if r < sh.http_weights[1] {
        Kind::Health
    } else {
        Kind::Reports
    }
}

async fn http_loop(sh: Arc<Shared>, id: usize, start: Instant) {
    let stats = &sh.stats;
    let mut sender: Option<Conn> = None;
    let mut next = start
        + sh.interval
            .map_or(Duration::ZERO, |i| i.mul_f64(fastrand::f64()));
    let mut seq: u64 = 0;
    loop {
        if let Some(interval) = sh.interval {
            tokio::time::sleep_until(next.into()).await;
            next += interval;
            let now = Instant::now();
            if next < now {
                next = now;
            }
        }
        if Instant::now() >= sh.deadline {
            break;
        }
        seq += 1;
        let kind = pick_http_kind(&sh);
        let k = &stats.kinds[kind as usize];
        k.attempted.fetch_add(1, Relaxed);
        let rid = format!("{}-{}-{id}-{seq}", sh.o.rid_prefix, kind.name());
        let (mut req, expect) = match kind {
            Kind::Proxied => proxied_request(&rid),
            Kind::Health => health_request(&rid, seq),
            _ => report_request(&sh.o, &rid, ((id as u64) << 20) | seq),
        };
        let mut retried = false;
        loop {
            // A keep-alive connection the server closed (its last answer
            // said `Connection: close`, or a FIN while idle) is replaced,
            // as any client does; that is no failure.
            if let Some(c) = sender.as_mut() {
                let ready = tokio::time::timeout(sh.o.timeout, c.sender.ready()).await;
                if !matches!(ready, Ok(Ok(()))) {
                    stats.server_closed.fetch_add(1, Relaxed);
                    sender = None;
                }
            }
            if sender.is_none() {
                match connect_http(&sh.o, stats).await {
                    Ok(s) => sender = Some(s),
                    Err(ConnectError::Refused(m)) => {
                        stats.fail(kind, Class::Refused, || m);
                        break;
                    }
                    Err(ConnectError::Other(m)) => {
                        stats.fail(kind, Class::Connect, || m);
                        break;
                    }
                }
            }
            let c = sender.as_mut().expect("connected above");
            c.used += 1;
            match exchange(&sh.o, &mut c.sender, req, &expect).await {
                Outcome::Ok(took) => {
                    k.sent.fetch_add(1, Relaxed);
                    stats.ok(kind, took);
                }
                Outcome::Failed(m) => {
                    k.sent.fetch_add(1, Relaxed);
                    if c.used == 1 {
                        stats.in_flight_on_new.fetch_add(1, Relaxed);
                    }
                    let (port, used) = (c.port, c.used);
                    stats.fail(kind, Class::InFlight, || {
                        format!("{m} (local port {port}, request {used} on the connection)")
                    });
                    sender = None;
                }
                Outcome::Unsent(back, m) => {
                    sender = None;
                    if !retried {
                        retried = true;
                        k.unsent_retried.fetch_add(1, Relaxed);
                        req = *back;
                        continue;
                    }
                    stats.fail(kind, Class::Unsent, || m);
                }
            }
            break;
        }
        if sender.is_none() && sh.interval.is_none() {
            // Closed loop against a closed port: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn ws_loop(sh: Arc<Shared>, id: usize, start: Instant) {
    tokio::time::sleep_until(start.into()).await;
    let mut seq: u64 = 0;
    while Instant::now() < sh.deadline {
        seq += 1;
        let stats = &sh.stats;
        stats.kinds[Kind::Ws as usize]
            .attempted
            .fetch_add(1, Relaxed);
        let rid = format!("{}-ws-{id}-{seq}", sh.o.rid_prefix);
        let refused = match ws_cycle(&sh, &rid).await {
            Ok(()) => false,
            Err((class, msg)) => {
                stats.fail(Kind::Ws, class, || format!("{rid}: {msg}"));
                matches!(class, Class::Refused | Class::Connect)
            }
        };
        if refused {
            // Pace reconnects to a closed port as an HTTP connection would.
            let pause = sh.interval.unwrap_or(Duration::from_millis(100));
            tokio::time::sleep(pause).await;
        }
    }
}

/// One tunnel: upgrade, echoes spread over the hold time, clean close.
async fn ws_cycle(sh: &Shared, rid: &str) -> Result<(), (Class, String)> {
    let o = &sh.o;
    let stats = &sh.stats;
    let stream = tcp_connect(o).await.map_err(|e| match e {
        ConnectError::Refused(m) => (Class::Refused, m),
        ConnectError::Other(m) => (Class::Connect, m),
    })?;
    let _open = Open::new(stats);
    let (mut sender, conn) = http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| (Class::Connect, format!("handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let key = {
        use base64::Engine;
        let raw: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    let req = base("GET", "/ws", rid)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", key)
        .body(Body::default())
        .unwrap();
    let started = Instant::now();
    let kstats = &stats.kinds[Kind::Ws as usize];
    let upgraded = async {
        let mut resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => {
                return Err(if e.take_message().is_some() {
                    (Class::Unsent, error_chain(e.error()))
                } else {
                    (Class::InFlight, error_chain(e.error()))
                });
            }
        };
        let protocol = resp
            .headers()
            .get("upgrade")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS
            || !protocol
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case("websocket"))
        {
            return Err((
                Class::InFlight,
                format!(
                    "status {} upgrade {protocol:?}, wanted 101 websocket",
                    resp.status()
                ),
            ));
        }
        hyper::upgrade::on(&mut resp)
            .await
            .map_err(|e| (Class::InFlight, format!("upgrade: {}", error_chain(&e))))
    };
    let upgraded = match tokio::time::timeout(o.timeout, upgraded).await {
        Ok(Err((Class::Unsent, m))) => return Err((Class::Unsent, m)),
        Ok(r) => {
            // Written (or possibly written): the sidecar owes it a line.
            kstats.sent.fetch_add(1, Relaxed);
            r?
        }
        Err(_) => {
            kstats.sent.fetch_add(1, Relaxed);
            return Err((Class::InFlight, format!("no 101 within {:?}", o.timeout)));
        }
    };
    let upgrade_took = started.elapsed();
    stats.tunnels_opened.fetch_add(1, Relaxed);
    let mut io = TokioIo::new(upgraded);

    // Echoes, spread over the hold time (±25 %), cut short at the deadline.
    let hold = o.ws_hold.mul_f64(0.75 + fastrand::f64() / 2.0);
    let gap = hold / o.ws_echoes;
    let mut buf = Vec::new();
    for i in 0..o.ws_echoes {
        if i > 0 {
            tokio::time::sleep(gap).await;
            if Instant::now() >= sh.deadline {
                break;
            }
        }
        let len = fastrand::usize(16..=1024);
        let mut msg = format!("{rid}-{i}-").into_bytes();
        msg.resize(len.max(msg.len()), b'a' + (i % 26) as u8);
        stats.echoes_sent.fetch_add(1, Relaxed);
        let t = Instant::now();
        buf.resize(msg.len(), 0);
        let echo = async {
            io.write_all(&msg).await?;
            io.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(o.timeout, echo).await {
            Ok(Ok(())) if buf == msg => {
                stats.echoes_ok.fetch_add(1, Relaxed);
                stats.echo_latency.record(t.elapsed());
            }
            Ok(Ok(())) => return Err((Class::InFlight, format!("echo {i} came back different"))),
            Ok(Err(e)) => return Err((Class::InFlight, format!("echo {i}: {e}"))),
            Err(_) => {
                return Err((
                    Class::InFlight,
                    format!("echo {i}: no reply within {:?}", o.timeout),
                ))
            }
        }
    }
    // Clean close: our FIN, then the app's FIN through the sidecar.
    let close = async {
        io.shutdown().await?;
        let mut rest = [0u8; 64];
        let n = io.read(&mut rest).await?;
        Ok::<_, std::io::Error>(n)
    };
    match tokio::time::timeout(o.timeout, close).await {
        Ok(Ok(0)) => {
            stats.tunnels_closed_clean.fetch_add(1, Relaxed);
        }
        Ok(Ok(n)) => {
            return Err((
                Class::InFlight,
                format!("{n} unexpected bytes after the last echo"),
            ))
        }
        Ok(Err(e)) => return Err((Class::InFlight, format!("close: {e}"))),
        Err(_) => {
            return Err((
                Class::InFlight,
                format!("no FIN back within {:?}", o.timeout),
            ))
        }
    }
    stats.ok(Kind::Ws, upgrade_took);
    Ok(())
}

// --- main ----------------------------------------------------------------------------

fn main() {
    let o = parse_options();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if o.threads > 0 {
        rt.worker_threads(o.threads);
    }
    let rt = rt.build().expect("tokio runtime");
    let failed = rt.block_on(run(o));
    std::process::exit(i32::from(failed));
}

async fn run(o: Options) -> bool {
    let n = o.connections;
    let total_w: u64 = o.mix.iter().map(|&w| u64::from(w)).sum();
    let ws_w = u64::from(o.mix[Kind::Ws as usize]);
    // Connection i is a tunnel loop when the running share of ws crosses an
    // integer there: ws connections spread evenly over the ramp.
    let is_ws = |i: usize| ((i as u64 + 1) * ws_w / total_w) != (i as u64 * ws_w / total_w);
    let n_ws = (0..n).filter(|&i| is_ws(i)).count();
    let n_http = n - n_ws;
    let http_weights = {
        let p = o.mix[0];
        let h = p + o.mix[1];
        [p, h, h + o.mix[2]]
    };
    if n_http > 0 && http_weights[2] == 0 {
        usage("--mix: HTTP connections exist but proxied, health and reports are all 0");
    }
    let interval = o
        .rate
        .filter(|_| n_http > 0)
        .map(|r| Duration::from_secs_f64(n_http as f64 / r));
    let seconds = (o.duration + o.timeout * 3 + o.ws_hold * 2).as_secs() as usize + 5;
    let stats = Arc::new(Stats::new(seconds));
    let t0 = stats.t0;
    let t0_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // The ramp counts in the duration.
    let deadline = t0 + o.duration;
    let sh = Arc::new(Shared {
        o,
        stats: stats.clone(),
        deadline,
        interval,
        http_weights,
    });
    eprintln!(
        "mixed_load: {n} connections ({n_http} HTTP, {n_ws} tunnel loops) to {} for {:?}, ramp {:?}, rate {}",
        sh.o.target,
        sh.o.duration,
        sh.o.ramp,
        sh.o.rate.map_or("unpaced".to_owned(), |r| format!("{r} req/s"))
    );

    // Progress on stderr every 5 s.
    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                (t0 + Duration::from_secs(5)).into(),
                Duration::from_secs(5),
            );
            loop {
                tick.tick().await;
                let ok: u64 = stats.kinds.iter().map(|k| k.ok.load(Relaxed)).sum();
                let failed: u64 = stats
                    .kinds
                    .iter()
                    .map(|k| k.failed.iter().map(|f| f.load(Relaxed)).sum::<u64>())
                    .sum();
                eprintln!(
                    "mixed_load: {:>5.1}s ok {ok} failed {failed} open {} tunnels {}",
                    t0.elapsed().as_secs_f64(),
                    stats.open_now.load(Relaxed),
                    stats.tunnels_opened.load(Relaxed),
                );
            }
        })
    };

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let start = t0 + sh.o.ramp.mul_f64(i as f64 / n as f64);
        let sh = sh.clone();
        tasks.push(if is_ws(i) {
            tokio::spawn(ws_loop(sh, i, start))
        } else {
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                http_loop(sh, i, start).await
            })
        });
    }
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let elapsed = t0.elapsed().as_secs_f64();
    report(&sh, &stats, elapsed, t0_unix_ms, n_http, n_ws)
}

fn report(
    sh: &Shared,
    stats: &Stats,
    elapsed: f64,
    t0_unix_ms: u64,
    n_http: usize,
    n_ws: usize,
) -> bool {
    let mut kinds = serde_json::Map::new();
    let (mut attempted, mut sent, mut ok, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut http_ok = 0;
    for kind in KINDS {
        let k = &stats.kinds[kind as usize];
        let by_class: Vec<u64> = k.failed.iter().map(|f| f.load(Relaxed)).collect();
        let f: u64 = by_class.iter().sum();
        let a = k.attempted.load(Relaxed);
        let s = k.sent.load(Relaxed);
        let good = k.ok.load(Relaxed);
        attempted += a;
        sent += s;
        ok += good;
        failed += f;
        if kind != Kind::Ws {
            http_ok += good;
        }
        let mut classes = serde_json::Map::new();
        for (name, c) in CLASS_NAMES.iter().zip(&by_class) {
            classes.insert((*name).to_owned(), json!(c));
        }
        let errors = stats.errors[kind as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        kinds.insert(
            kind.name().to_owned(),
            json!({
                "attempted": a,
                "sent": s,
                "ok": good,
                "failed": f,
                "failed_by_class": classes,
                "unsent_retried": k.unsent_retried.load(Relaxed),
                "errors": errors,
                "latency_ms": stats.latency[kind as usize].summary(),
            }),
        );
    }
    let last = stats
        .per_second
        .iter()
        .rposition(|row| row.iter().any(|c| c.load(Relaxed) > 0))
        .map_or(0, |i| i + 1);
    let per_second: Vec<Vec<u64>> = stats.per_second[..last]
        .iter()
        .map(|row| row.iter().map(|c| c.load(Relaxed)).collect())
        .collect();
    let mut failure_window = serde_json::Map::new();
    for (i, name) in CLASS_NAMES.iter().enumerate() {
        let first = stats.first_fail_ms[i].load(Relaxed);
        if first != u64::MAX {
            failure_window.insert(
                (*name).to_owned(),
                json!({"first": first, "last": stats.last_fail_ms[i].load(Relaxed)}),
            );
        }
    }
    let echoes_sent = stats.echoes_sent.load(Relaxed);
    let echoes_ok = stats.echoes_ok.load(Relaxed);
    let out = json!({
        "target": sh.o.target.to_string(),
        "connections": sh.o.connections,
        "http_connections": n_http,
        "tunnel_connections": n_ws,
        "duration_s": sh.o.duration.as_secs_f64(),
        "ramp_s": sh.o.ramp.as_secs_f64(),
        "rate_cap": sh.o.rate,
        "mix": {"proxied": sh.o.mix[0], "health": sh.o.mix[1], "reports": sh.o.mix[2], "ws": sh.o.mix[3]},
        "rid_prefix": sh.o.rid_prefix,
        "t0_unix_ms": t0_unix_ms,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "kinds": kinds,
        "totals": {"attempted": attempted, "sent": sent, "ok": ok, "failed": failed},
        "tunnels": {
            "opened": stats.tunnels_opened.load(Relaxed),
            "closed_clean": stats.tunnels_closed_clean.load(Relaxed),
            "echoes_sent": echoes_sent,
            "echoes_ok": echoes_ok,
            "echo_latency_ms": stats.echo_latency.summary(),
        },
        "achieved_rps": {
            "http": (http_ok as f64 / sh.o.duration.as_secs_f64()).round(),
            "all_requests": (ok as f64 / sh.o.duration.as_secs_f64()).round(),
            "echoes": (echoes_ok as f64 / sh.o.duration.as_secs_f64()).round(),
        },
        "connections_opened": stats.connections_opened.load(Relaxed),
        "peak_open_connections": stats.open_peak.load(Relaxed),
        "reconnects_after_server_close": stats.server_closed.load(Relaxed),
        "in_flight_failures_on_new_connections": stats.in_flight_on_new.load(Relaxed),
        "last_ok_ms": stats.last_ok_ms.load(Relaxed),
        "failure_window_ms": failure_window,
        "per_second_columns": ["ok", "connect_refused", "connect_other", "unsent", "in_flight"],
        "per_second": per_second,
        "per_second_max_ms": stats.per_second_max_us[..last]
            .iter()
            .map(|m| (m.load(Relaxed) as f64 / 1000.0).round())
            .collect::<Vec<_>>(),
    });
    println!("{out}");
    failed > 0 || echoes_ok != echoes_sent
}
