//! Memory a burst of traffic left behind goes back to the system once the
//! traffic stops.
//!
//! mimalloc keeps what a worker thread freed in that thread's pages: a page
//! whose blocks were all freed is kept "retired" for the thread's next
//! allocations, and a page freed by another thread waits for its owner to
//! collect it. Both only happen while the owner allocates, so a worker that
//! goes idle right after a load keeps the pages the load used: about 1 MB
//! of a 10 MB sidecar after 5 s of 64 connections (BENCHMARKS.md).
//!
//! A watcher samples the process's CPU time once a second. When a second
//! passes quiet after a busy one, and every 10 s while it stays quiet, it
//! raises `WANTED`; each worker thread, the next time it parks, sees the new
//! value and runs mimalloc's forced collection on its own heap (empty pages
//! freed, and given back to the system at once instead of after the purge
//! delay). Nothing is done while requests keep coming. A collection of a
//! heap with nothing to give back costs tens of microseconds.
//!
//! With one worker (the current-thread runtime) the watcher's own wake-up is
//! that worker's, so it collects within the second. With several, the
//! watcher also spawns a few empty tasks: a spawn wakes an idle worker to
//! look for work, and it parks again (and collects) once it finds none.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the watcher samples the CPU time.
const TICK: Duration = Duration::from_secs(1);
/// CPU time in one tick under which the process counts as quiet. An idle
/// sidecar (the watcher, the pool's reaper) uses about 0.3 ms a second;
/// 1,000 req/s about 60 ms.
const QUIET: Duration = Duration::from_millis(2);
/// While quiet, a collection every this many ticks all the same: what
/// freed memory without costing `QUIET` (keep-alive connections closing
/// after their idle timeout, a few requests) is given back too.
const SWEEP: u32 = 10;

/// Collections asked for so far.
static WANTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Collections this thread has done.
    static DONE: Cell<u64> = const { Cell::new(0) };
}

/// For the runtime's `on_thread_park`: one load of an atomic unless a
/// collection is due.
pub fn on_park() {
    let wanted = WANTED.load(Ordering::Relaxed);
    DONE.with(|done| {
        if done.get() != wanted {
            done.set(wanted);
            collect();
        }
    });
}

fn collect() {
    // SAFETY: mi_collect takes no pointer; it walks the calling thread's own
    // heap, which is mimalloc's (the global allocator, src/main.rs).
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The process's CPU time (user and system, every thread).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs for the life of the runtime (of `workers` worker threads): raises
/// `WANTED` on the first quiet tick after a busy one, and on every
/// `SWEEP`th quiet tick in a row; never while busy.
pub async fn watch(workers: usize) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = cpu_time();
    let mut busy = false;
    let mut quiet_ticks = 0;
    loop {
        tick.tick().await;
        let now = cpu_time();
        let used = now.saturating_sub(last);
        last = now;
        if used >= QUIET {
            busy = true;
            continue;
        }
        quiet_ticks += 1;
        if busy || quiet_ticks >= SWEEP {
            busy = false;
            quiet_ticks = 0;
            WANTED.fetch_add(1, Ordering::Relaxed);
            if workers > 1 {
                for _ in 0..2 * workers {
                    tokio::spawn(async {});
                }
            }
        }
    }
}
