//! The pool of connections to the app, and the runtime's size: connections
//! are reused after every kind of response body, given back only when the
//! body was read to its end, closed when idle too long, and the worker
//! count follows the CPUs the process may use.

mod common;

use std::time::{Duration, Instant};

use common::{get, request, SidecarBuilder, Upstream, DEADLINE};
use http_body_util::BodyExt;

/// The `dockerflow_sidecar_upstream_connections` gauge.
async fn open_upstream_connections(sidecar: &common::Sidecar) -> i64 {
    let text = get(&sidecar.admin_url("/metrics"), &[]).await.body;
    let text = String::from_utf8_lossy(&text).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("dockerflow_sidecar_upstream_connections "))
        .expect("the gauge is exported")
        .trim()
        .parse()
        .unwrap()
}

/// A sidecar with one worker, so one pool: each worker has its own, and a
/// new client connection may go to either worker (see the last test).
fn one_worker(app: &Upstream) -> common::Sidecar {
    SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "1")
        .start()
}

#[tokio::test]
async fn one_connection_serves_every_kind_of_exchange_in_turn() {
    let app = Upstream::start();
    let sidecar = one_worker(&app);
    for round in 0..20 {
        assert_eq!(get(&sidecar.url("/echo"), &[]).await.status, 200);
        let posted = request("POST", &sidecar.url("/count"), &[], vec![b'x'; 100_000]).await;
        assert_eq!(posted.json()["bytes"], 100_000);
        assert_eq!(
            request("HEAD", &sidecar.url("/x"), &[], "").await.status,
            200
        );
        assert_eq!(get(&sidecar.url("/status/204"), &[]).await.status, 204);
        assert_eq!(get(&sidecar.url("/status/304"), &[]).await.status, 304);
        assert_eq!(get(&sidecar.url("/status/503"), &[]).await.status, 503);
        let trailers = get(&sidecar.url("/trailers"), &[]).await;
        assert_eq!(trailers.status, 200);
        // With TE: trailers the app sends them, and they end the body.
        let with = request("GET", &sidecar.url("/trailers"), &[("te", "trailers")], "").await;
        assert_eq!(with.status, 200);
        let download = get(&sidecar.url("/download/327680"), &[]).await;
        assert_eq!(download.body.len(), 327_680);
        assert_eq!(
            app.accepted(),
            1,
            "round {round}: every exchange went over the one pooled connection"
        );
    }
    assert_eq!(app.hits(), 180);
}

#[tokio::test]
async fn concurrent_requests_open_one_connection_each_then_reuse_them() {
    let app = Upstream::start();
    let sidecar = one_worker(&app);
    for wave in 0..3 {
        let url = sidecar.url("/slow/100");
        let requests = (0..16).map(|_| get(&url, &[]));
        for reply in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, 200);
        }
        assert!(
            app.accepted() <= 16,
            "wave {wave}: {} connections for 16 concurrent requests",
            app.accepted()
        );
    }
    assert_eq!(app.hits(), 48);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_UPSTREAM__POOL_IDLE_TIMEOUT", "200ms")
        .start();
    assert_eq!(get(&sidecar.url("/a"), &[]).await.status, 200);
    assert_eq!(open_upstream_connections(&sidecar).await, 1);
    let end = Instant::now() + DEADLINE;
    while open_upstream_connections(&sidecar).await != 0 {
        assert!(Instant::now() < end, "the idle connection was never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&sidecar.url("/b"), &[]).await.status, 200);
    assert_eq!(
        app.accepted(),
        2,
        "a new connection after the idle one closed"
    );
}

#[tokio::test]
async fn a_body_cut_short_does_not_return_its_connection() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url()).start();
    {
        // Read the head of a large download, then hang up.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let resp = client
            .get(sidecar.url("/download/50000000").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
    }
    // The half-read connection is not reused: the next request gets a fresh
    // one and a whole, correct answer.
    let reply = get(&sidecar.url("/download/65536"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 65_536);
    assert_eq!(app.accepted(), 2);
    let end = Instant::now() + DEADLINE;
    while open_upstream_connections(&sidecar).await != 1 {
        assert!(Instant::now() < end, "the cut connection stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `workers` field of the `listening` line.
fn workers(sidecar: &common::Sidecar) -> u64 {
    let line = sidecar
        .stdout
        .wait_for("listening", |l| l.contains("\"msg\":\"listening\""));
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    json["Fields"]["workers"]
        .as_u64()
        .expect("workers is logged")
}

#[tokio::test]
async fn workers_follow_the_cpus_the_process_may_use() {
    let app = Upstream::start();
    // Pinned to one CPU: one worker (the current-thread scheduler).
    let pinned = SidecarBuilder::new(&app.url()).cpus("0").start();
    assert_eq!(workers(&pinned), 1);
    assert_eq!(get(&pinned.url("/x"), &[]).await.status, 200);
    // Unpinned: one per CPU this process may use.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let free = SidecarBuilder::new(&app.url()).start();
    assert_eq!(workers(&free), cpus);
    // Set explicitly: that many.
    let three = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "3")
        .start();
    assert_eq!(workers(&three), 3);
}

/// CPU time so far of each worker thread (worker 0 is the main thread, the
/// others are named `worker-N`), in nanoseconds, by worker.
fn worker_cpu_ns(sidecar: &common::Sidecar) -> Vec<u64> {
    let pid = sidecar.pid();
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let tid: i32 = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // a thread that ended meanwhile
        };
        let index = match comm.trim().strip_prefix("worker-") {
            Some(n) => n.parse::<usize>().unwrap(),
            None if tid == pid => 0,
            None => continue,
        };
        // schedstat: time on the CPU (ns), time waiting for it, slices.
        let schedstat = std::fs::read_to_string(dir.join("schedstat")).unwrap();
        let ns: u64 = schedstat
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        workers.push((index, ns));
    }
    workers.sort();
    workers.into_iter().map(|(_, ns)| ns).collect()
}

#[tokio::test]
async fn every_worker_serves_a_share_of_the_connections_through_a_pool_of_its_own() {
    let app = Upstream::start();
    let sidecar = SidecarBuilder::new(&app.url())
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "2")
        // A worker's connection waits idle while requests hash to the other
        // one: on a loaded machine that can outlast the default 1 s.
        .env("DOCKERFLOW_UPSTREAM__POOL_IDLE_TIMEOUT", "1m")
        .start();
    assert_eq!(workers(&sidecar), 2);
    // One request at a time, each on a new client connection: the kernel
    // spreads the connections between the workers' sockets by a hash of the
    // client port, and each worker keeps reusing its own connection to the
    // app (a pool shared by both would have opened one).
    for _ in 0..40 {
        assert_eq!(get(&sidecar.url("/echo"), &[]).await.status, 200);
    }
    assert_eq!(app.accepted(), 2, "one upstream connection per worker");
    let before = worker_cpu_ns(&sidecar);
    assert_eq!(before.len(), 2, "the main thread and worker-1");
    // 200 connections more, 20 at a time: both workers do a share of the work.
    let url = sidecar.url("/echo");
    for _ in 0..10 {
        let requests = (0..20).map(|_| get(&url, &[]));
        for reply in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, 200);
        }
    }
    let after = worker_cpu_ns(&sidecar);
    let used: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = used.iter().sum();
    for (worker, ns) in used.iter().enumerate() {
        assert!(
            *ns * 10 >= total,
            "worker {worker} used {ns} ns of {total}: it served (almost) none of 200 connections"
        );
    }
    assert_eq!(app.hits(), 240);
}
