//! The one writer of stdout. Request tasks append finished lines to a shared
//! buffer (a short lock and a copy, no wake-up); one thread swaps the buffer
//! out and writes it in one go, 100 ms after the first line of a batch or as
//! soon as it holds 64 KiB. A slow stdout never blocks a request; the writer
//! costs a wake-up per batch, not per line, and none at all while nothing is
//! logged.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the writer lets a batch fill after its first line. Each batch
/// costs a wake-up of the writer and a futex call on the request side: at
/// 10 ms they were 11 % of the process's CPU at 1,000 req/s (0.097 against
/// 0.086 core, BENCHMARKS.md). A line still reaches stdout within 0.1 s.
const INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full wakes the writer at once.
const BATCH: usize = 64 * 1024;
/// Bytes queued at most (stdout stalled): past that, lines are counted and
/// dropped rather than growing memory or blocking requests.
const LIMIT: usize = 16 * 1024 * 1024;

/// What the request side and the writer share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer.
    work: Condvar,
    /// Wakes callers of `flush`.
    done: Condvar,
    /// Lines dropped because the buffer was full, not yet reported.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Lines waiting to be written.
    pending: Vec<u8>,
    /// Flushes asked for so far.
    requested: u64,
    /// Flushes completed so far.
    completed: u64,
}

/// Hands lines to the writer thread.
pub struct Sink {
    shared: Arc<Shared>,
}

impl Sink {
    /// Starts the writer thread over `out`. The thread lives as long as the
    /// process; `flush` is what guarantees that no line is lost at exit.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Sink> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("mozlog-writer".into())
            .spawn(move || write_loop(&writer, out))?;
        Ok(Sink { shared })
    }

    /// Queues one finished line (newline included), or counts it as dropped
    /// when the buffer is full.
    pub fn write(&self, line: &[u8]) {
        let mut state = self.lock();
        if state.pending.len() + line.len() > LIMIT {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = state.pending.is_empty();
        let was_below = state.pending.len() < BATCH;
        state.pending.extend_from_slice(line);
        // The first line of a batch starts the writer's clock; a full batch
        // cuts its wait short. Lines in between wake nobody.
        let wake = was_empty || (was_below && state.pending.len() >= BATCH);
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        if self.shared.dropped.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.shared.dropped.swap(0, Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every line queued before this call is
    /// written and the output flushed.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        self.shared.work.notify_one();
        while state.completed < ticket {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = match self.shared.done.wait_timeout(state, deadline - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the buffer in a state
        // worse than a partial line; keep logging.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Empties a written batch for reuse. A batch that grew past four times
/// the usual size (a burst, or stdout stalled) is let go: the two buffers
/// trade places on every batch, so without this both kept their peak size
/// for good, up to the 16 MiB limit each after a stall of stdout.
fn recycle(batch: &mut Vec<u8>) {
    if batch.capacity() > BATCH * 4 {
        *batch = Vec::with_capacity(BATCH * 2);
    } else {
        batch.clear();
    }
}

fn write_loop(shared: &Shared, out: Box<dyn Write + Send>) {
    let mut out = out;
    let mut batch = Vec::with_capacity(BATCH * 2);
    loop {
        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        // Asleep until a line or a flush comes: no timer while idle.
        while state.pending.is_empty() && state.completed == state.requested {
            state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        // Give a filling buffer a moment to become a batch, unless it is
        // already one or somebody waits for a flush.
        if state.pending.len() < BATCH && state.completed == state.requested {
            state = match shared.work.wait_timeout(state, INTERVAL) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        std::mem::swap(&mut batch, &mut state.pending);
        let ticket = state.requested;
        drop(state);

        let _ = out.write_all(&batch);
        let _ = out.flush();
        recycle(&mut batch);

        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.completed < ticket {
            state.completed = ticket;
            shared.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that grew in a burst is given back; a usual one is kept.
    #[test]
    fn a_batch_grown_in_a_burst_is_let_go() {
        let mut usual = Vec::with_capacity(BATCH * 2);
        usual.extend_from_slice(&[b'x'; 1000]);
        recycle(&mut usual);
        assert!(usual.is_empty());
        assert_eq!(usual.capacity(), BATCH * 2);

        let mut burst = vec![b'x'; BATCH * 16];
        recycle(&mut burst);
        assert!(burst.is_empty());
        assert!(burst.capacity() <= BATCH * 4, "{}", burst.capacity());
    }

    /// A writer the test can read back, and hold still.
    #[derive(Clone, Default)]
    struct Captured {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _held = self.gate.lock().unwrap();
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_writes_every_line_from_every_thread() {
        let out = Captured::default();
        let sink = Arc::new(Sink::new(Box::new(out.clone())).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        sink.write(format!("{t}-{i}\n").as_bytes());
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        sink.flush(Duration::from_secs(10));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 40_000);
        assert!(text.lines().any(|l| l == "3-9999"));
        assert_eq!(sink.take_dropped(), 0);
    }

    #[test]
    fn a_stalled_output_drops_and_counts_instead_of_growing() {
        let out = Captured::default();
        let held = out.gate.lock().unwrap();
        let sink = Sink::new(Box::new(out.clone())).unwrap();
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        // Twice the limit while the writer is stuck in its first write.
        let total = 2 * LIMIT / line.len();
        for _ in 0..total {
            sink.write(&line);
        }
        let dropped = sink.take_dropped() as usize;
        assert!(dropped > 0);
        drop(held);
        sink.flush(Duration::from_secs(10));
        let written = out.bytes.lock().unwrap().len() / line.len();
        assert_eq!(written + dropped, total, "every line is written or counted");
    }
}
