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
//! passes quiet (under 2 ms of CPU time, or under four times the least a
//! second has used so far where that is more: the process's own idle cost,
//! on a slow machine) after a busy one, again two quiet seconds later (what timers
//! freed after the first: the upstream pool closes its idle connections one
//! `pool_idle_timeout` after the traffic), and every 10 s while it stays
//! quiet, it raises `WANTED`; each worker thread, the next time it parks,
//! sees the new value and runs mimalloc's forced collection on its own heap
//! (empty pages freed, and given back to the system at once instead of after
//! the purge delay). Nothing is done while requests keep coming. A
//! collection costs tens of microseconds in a release build (a few hundred
//! in a debug one); its own CPU time is not counted as activity, or with
//! many workers the collections alone would make a second look busy and
//! start the next round.
//!
//! The watcher runs on worker 0, so its own wake-up is that worker's, and it
//! collects within the second. Every other worker has a runtime of its own
//! (src/main.rs): the watcher spawns an empty task on each, which wakes it,
//! and it parks again (and collects) once the task has run.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the watcher samples the CPU time.
const TICK: Duration = Duration::from_secs(1);
/// CPU time in one tick under which the process counts as quiet, at least.
/// An idle sidecar (the watcher, the pool's reaper) uses about 0.3 ms a
/// second in a release build; 1,000 req/s about 60 ms.
const QUIET: Duration = Duration::from_millis(2);
/// ... or this many times the least CPU time a tick has used so far (the
/// process's own idle cost): a debug build on a machine several times
/// slower idles above `QUIET`, and would otherwise never look quiet.
const QUIET_OVER_FLOOR: u32 = 4;
/// Ticks that used this much are traffic, never the idle cost, even when no
/// quieter tick has come yet (a sidecar started under load).
const FLOOR_AT_MOST: Duration = Duration::from_millis(20);
/// While quiet, a collection every this many ticks all the same: what
/// freed memory without costing `QUIET` (keep-alive connections closing
/// after their idle timeout, a few requests) is given back too.
const SWEEP: u32 = 10;
/// Quiet ticks from the collection after a burst to the follow-up one.
const FOLLOW_UP: u32 = 2;

/// Collections asked for so far.
static WANTED: AtomicU64 = AtomicU64::new(0);
/// CPU time the collections took, in nanoseconds, all threads together.
static COLLECTING: AtomicU64 = AtomicU64::new(0);

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
    let started = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
    // SAFETY: mi_collect takes no pointer; it walks the calling thread's own
    // heap, which is mimalloc's (the global allocator, src/main.rs).
    unsafe { libmimalloc_sys::mi_collect(true) }
    let took = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(started);
    COLLECTING.fetch_add(
        u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// CPU time so far on `clock`: the process's (user and system, every
/// thread) or the calling thread's.
fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock ids passed are
    // the two constants above.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time the process spent on anything but collections.
fn activity() -> Duration {
    cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID)
        .saturating_sub(Duration::from_nanos(COLLECTING.load(Ordering::Relaxed)))
}

/// What the watcher decides at each tick.
#[derive(Debug, Default)]
struct Watcher {
    /// A busy tick came since the last collection.
    busy: bool,
    /// Quiet ticks counted towards the next collection.
    quiet_ticks: u32,
    /// The least CPU time a tick has used so far.
    floor: Option<Duration>,
}

impl Watcher {
    /// Whether to collect after a tick that used `used` of CPU time.
    fn tick(&mut self, used: Duration) -> bool {
        if used < FLOOR_AT_MOST {
            self.floor = Some(self.floor.map_or(used, |f| f.min(used)));
        }
        let floor = self.floor.unwrap_or_default();
        if used >= QUIET.max(floor * QUIET_OVER_FLOOR) {
            self.busy = true;
            return false;
        }
        self.quiet_ticks += 1;
        if self.busy {
            // The first quiet tick after traffic; the follow-up comes
            // FOLLOW_UP quiet ticks later.
            self.busy = false;
            self.quiet_ticks = SWEEP - FOLLOW_UP;
            return true;
        }
        if self.quiet_ticks >= SWEEP {
            self.quiet_ticks = 0;
            return true;
        }
        false
    }
}

/// Runs for the life of the sidecar, on worker 0 (`others` are the other
/// workers' runtimes): raises `WANTED` on the first quiet tick after a busy
/// one, `FOLLOW_UP` quiet ticks later, and on every `SWEEP`th quiet tick in
/// a row; never while busy.
pub async fn watch(others: Vec<tokio::runtime::Handle>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = activity();
    let mut watcher = Watcher::default();
    loop {
        tick.tick().await;
        let now = activity();
        let used = now.saturating_sub(last);
        last = now;
        if watcher.tick(used) {
            WANTED.fetch_add(1, Ordering::Relaxed);
            for other in &others {
                drop(other.spawn(async {}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Duration = Duration::from_millis(50);
    const IDLE: Duration = Duration::from_micros(300);

    /// The ticks at which a run of samples collects.
    fn collections(samples: &[Duration]) -> Vec<usize> {
        let mut watcher = Watcher::default();
        (0..samples.len())
            .filter(|&i| watcher.tick(samples[i]))
            .collect()
    }

    #[test]
    fn a_burst_is_collected_at_once_then_again_two_quiet_seconds_later() {
        let mut samples = vec![BUSY; 5];
        samples.extend([IDLE; 25]);
        // Tick 5 is the first quiet one; 7 the follow-up; then every 10.
        assert_eq!(collections(&samples), [5, 7, 17, 27]);
    }

    #[test]
    fn nothing_is_collected_while_traffic_keeps_coming() {
        assert_eq!(collections(&[BUSY; 40]), Vec::<usize>::new());
        // A quiet second between two busy ones is a burst's end.
        assert_eq!(collections(&[BUSY, BUSY, IDLE, BUSY, IDLE, IDLE]), [2, 4]);
    }

    #[test]
    fn a_slow_machine_whose_idle_is_above_the_threshold_still_looks_quiet() {
        // A debug build on a slow machine: idle costs 3 ms a second.
        let slow_idle = Duration::from_millis(3);
        let mut samples = vec![slow_idle; 3];
        samples.extend([BUSY; 5]);
        samples.extend([slow_idle; 5]);
        assert_eq!(collections(&samples), [8, 10]);
        // Light traffic on that machine is still traffic.
        let light = Duration::from_millis(15);
        assert_eq!(collections(&[slow_idle, light, light, slow_idle]), [3]);
    }

    #[test]
    fn an_idle_sidecar_is_swept_every_ten_seconds() {
        assert_eq!(collections(&[IDLE; 30]), [9, 19, 29]);
    }

    #[test]
    fn a_collection_counts_its_own_cpu_time() {
        // Pages to give back, so that the collections have work to do.
        let blocks: Vec<Vec<u8>> = (0..2_000).map(|i| vec![i as u8; 600]).collect();
        drop(blocks);
        let counted = COLLECTING.load(Ordering::Relaxed);
        let started = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
        for _ in 0..50 {
            collect();
        }
        let spent = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(started);
        let counted = Duration::from_nanos(COLLECTING.load(Ordering::Relaxed) - counted);
        // What `activity` leaves out is what the collections took on this
        // thread: not more, and not much less (the loop and the clock reads
        // around each collection are the rest).
        assert!(counted <= spent, "{counted:?} counted, {spent:?} spent");
        assert!(counted >= spent / 2, "{counted:?} counted, {spent:?} spent");
    }
}
