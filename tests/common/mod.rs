//! The test harness: a real hyper upstream on a free port, the real sidecar
//! binary in front of it, and clients (hyper, raw TCP).
#![allow(dead_code)]

pub mod receiver;
pub mod smtp;
pub mod upstream;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[allow(unused_imports)]
pub use upstream::Upstream;

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Lines a child wrote, shared with the thread reading them.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line satisfies `pred` and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_within(DEADLINE, &pred).unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; lines so far:\n{}",
                self.all().join("\n")
            )
        })
    }

    /// Waits up to `limit` for a line that satisfies `pred`.
    pub fn wait_for_within(&self, limit: Duration, pred: &impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + limit;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            lines = self.changed.wait_timeout(lines, end - now).unwrap().0;
        }
    }

    /// Waits for a line that satisfies `pred`, failing with `errors` (the
    /// child's stderr) if none comes: a child that could not start says why.
    pub fn wait_within_or_exit(&self, errors: &Lines, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_within(DEADLINE, &pred).unwrap_or_else(|| {
            panic!(
                "timed out; stdout:\n{}\nstderr:\n{}",
                self.all().join("\n"),
                errors.all().join("\n")
            )
        })
    }

    /// Waits until `count` lines satisfy `pred` and returns them.
    pub fn wait_for_count(
        &self,
        what: &str,
        count: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let end = Instant::now() + DEADLINE;
        let mut lines = self.lines.lock().unwrap();
        loop {
            let found: Vec<String> = lines.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < end,
                "timed out waiting for {count} × {what}; lines so far:\n{}",
                lines.join("\n")
            );
            lines = self.changed.wait_timeout(lines, end - now).unwrap().0;
        }
    }
}

/// The sidecar binary, started with a config file and environment.
pub struct Sidecar {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its admin listener listens, when enabled.
    pub admin: Option<SocketAddr>,
    /// Its stdout, line by line.
    pub stdout: Arc<Lines>,
    /// Its stderr, line by line.
    pub stderr: Arc<Lines>,
    /// Its working directory (config file `sidecar.toml`, state file).
    pub workdir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// How to start a sidecar.
pub struct SidecarBuilder {
    toml: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    files: Vec<(String, String)>,
    shutdown: (String, String),
    workdir: Option<PathBuf>,
    /// Run under `taskset -c` with this CPU list.
    cpus: Option<String>,
}

/// A port where connections are refused for as long as this lives: the
/// socket is bound, so no test running in parallel can take the port, but
/// it never listens.
pub struct ClosedPort {
    /// The port.
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    /// Starts listening on the port (an app that comes back).
    pub fn listen(self) -> std::net::TcpListener {
        self._socket.listen(128).unwrap().into_std().unwrap()
    }
}

/// A [`ClosedPort`] on 127.0.0.1.
pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    ClosedPort {
        port,
        _socket: socket,
    }
}

/// Runs a test server's future on a runtime of its own, in a thread, until
/// the test process ends (so it serves whatever the test's runtime does).
pub fn in_background(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    });
}

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dockerflow-sidecar"))
}

impl SidecarBuilder {
    /// A sidecar in front of `upstream` (a URL), listening on a free port,
    /// with a short drain so tests stop quickly.
    pub fn new(upstream: &str) -> SidecarBuilder {
        SidecarBuilder {
            toml: format!("listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{upstream}\"\n"),
            env: Vec::new(),
            args: Vec::new(),
            files: Vec::new(),
            shutdown: ("50ms".into(), "5s".into()),
            workdir: None,
            cpus: None,
        }
    }

    /// Appends raw TOML tables. TOML forbids repeating a table: `[upstream]`
    /// is already written, and `[shutdown]` is set with `shutdown()`.
    pub fn toml(mut self, extra: &str) -> Self {
        self.toml.push_str(extra);
        self.toml.push('\n');
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs in `dir` (kept after the sidecar stops, so another can start on
    /// the same state file) instead of a fresh temporary directory.
    pub fn workdir(mut self, dir: &std::path::Path) -> Self {
        self.workdir = Some(dir.to_owned());
        self
    }

    /// Sets `shutdown.drain` and `shutdown.grace` (default 50ms and 5s).
    pub fn shutdown(mut self, drain: &str, grace: &str) -> Self {
        self.shutdown = (drain.into(), grace.into());
        self
    }

    /// Runs it on these CPUs only (`taskset -c LIST`).
    pub fn cpus(mut self, list: &str) -> Self {
        self.cpus = Some(list.into());
        self
    }

    /// Writes a file into the sidecar's working directory before it starts.
    pub fn file(mut self, name: &str, contents: &str) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// Starts it and waits for its `listening` line.
    pub fn start(self) -> Sidecar {
        let (temp, workdir) = match &self.workdir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::tempdir().unwrap();
                let path = temp.path().to_owned();
                (Some(temp), path)
            }
        };
        let config = workdir.join("sidecar.toml");
        let (drain, grace) = &self.shutdown;
        let toml = format!(
            "{}[shutdown]\ndrain = \"{drain}\"\ngrace = \"{grace}\"\n",
            self.toml
        );
        std::fs::write(&config, toml).unwrap();
        for (name, contents) in &self.files {
            std::fs::write(workdir.join(name), contents).unwrap();
        }
        let mut cmd = match &self.cpus {
            None => Command::new(binary()),
            Some(list) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(list).arg(binary());
                cmd
            }
        };
        cmd.arg("--config")
            .arg(&config)
            .args(&self.args)
            .current_dir(&workdir)
            .env_remove("PORT")
            .env_remove("DOCKERFLOW_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A free port for the admin listener (a test may set another).
            .env("DOCKERFLOW_ADMIN__LISTEN", "127.0.0.1:0");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the sidecar binary");
        let stdout = read_lines(child.stdout.take().unwrap());
        let stderr = read_lines(child.stderr.take().unwrap());
        let end = Instant::now() + DEADLINE;
        let listening = |l: &str| l.contains("\"msg\":\"listening\"");
        let line = loop {
            if let Some(line) = stdout.wait_for_within(Duration::from_millis(50), &listening) {
                break line;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the sidecar exited ({status}) before listening; stderr:\n{}",
                    stderr.all().join("\n")
                );
            }
            assert!(Instant::now() < end, "the sidecar did not start listening");
        };
        let json: Value = serde_json::from_str(&line).unwrap();
        let addr = json["Fields"]["addr"].as_str().unwrap().parse().unwrap();
        // Logged before `listening` when the admin listener is on.
        let admin = stdout
            .all()
            .iter()
            .find(|l| l.contains("\"msg\":\"admin listening\""))
            .map(|l| {
                let json: Value = serde_json::from_str(l).unwrap();
                json["Fields"]["addr"].as_str().unwrap().parse().unwrap()
            });
        Sidecar {
            child,
            addr,
            admin,
            stdout,
            stderr,
            workdir,
            _temp: temp,
        }
    }
}

fn read_lines(stream: impl Read + Send + 'static) -> Arc<Lines> {
    let lines = Arc::new(Lines::default());
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => sink.push(line),
                Err(_) => break,
            }
        }
    });
    lines
}

impl Sidecar {
    /// `http://admin-addr/path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.expect("the admin listener is on")
        )
    }

    /// `http://addr/path` on the public listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (libc::SIGTERM, …).
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < end, "the sidecar did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The request.summary lines so far, parsed.
    pub fn summaries(&self) -> Vec<Value> {
        self.stdout
            .all()
            .iter()
            .filter(|l| l.contains("\"Type\":\"request.summary\""))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the summary line of the request with id `rid`.
    pub fn summary_for(&self, rid: &str) -> Value {
        let needle = format!("\"rid\":\"{rid}\"");
        let line = self.stdout.wait_for(&format!("summary of {rid}"), |l| {
            l.contains("\"Type\":\"request.summary\"") && l.contains(&needle)
        });
        serde_json::from_str(&line).unwrap()
    }

    /// Runs `dockerflow-sidecar ARGS` with this sidecar's configuration and
    /// working directory (for the `reports` commands).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .arg("--config")
            .arg(self.workdir.join("sidecar.toml"))
            .current_dir(&self.workdir)
            .env_remove("PORT")
            .env_remove("DOCKERFLOW_CONFIG");
        // The admin listener where it really is (it was started on port 0).
        if let Some(admin) = self.admin {
            cmd.env("DOCKERFLOW_ADMIN__LISTEN", admin.to_string());
        }
        cmd.output().unwrap()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A KiB field of /proc/PID/status (`VmRSS`, `RssAnon`, …).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as the test sees it.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A pooled HTTP/1.1 client that keeps its connections alive between
/// requests, for tests that send many.
pub fn keep_alive_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request with hyper's client (HTTP/1.1, or h2c when `h2`).
pub async fn send(req: http::Request<Full<Bytes>>, h2: bool) -> Reply {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("response within the deadline")
        .expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// GET `url` with optional extra headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    request("GET", url, headers, Bytes::new()).await
}

/// POSTs a legacy CSP report (`application/csp-report`) to the default
/// report path.
pub async fn post_csp_report(sidecar: &Sidecar, body: impl Into<Bytes>) -> Reply {
    request(
        "POST",
        &sidecar.url("/__cspreport__"),
        &[("content-type", "application/csp-report")],
        body,
    )
    .await
}

/// Any request over HTTP/1.1.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    send(builder.body(Full::new(body.into())).unwrap(), false).await
}

/// Writes `request` on a fresh TCP connection and reads until the peer
/// closes (send `Connection: close`) or the deadline.
pub fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a connection, asks to upgrade `/upgrade` to the `echo` protocol with
/// request id `rid`, and returns the stream and the response head (lower-cased).
pub fn open_tunnel(addr: SocketAddr, rid: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let request =
        format!("GET /upgrade HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: echo\r\nx-request-id: {rid}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    (
        stream,
        String::from_utf8(head).unwrap().to_ascii_lowercase(),
    )
}

/// Sends `message` through an open echo tunnel and checks the echo.
pub fn assert_echo(stream: &mut TcpStream, message: &str) {
    stream.write_all(message.as_bytes()).unwrap();
    let mut reply = vec![0u8; 5 + message.len()];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(String::from_utf8(reply).unwrap(), format!("echo:{message}"));
}
