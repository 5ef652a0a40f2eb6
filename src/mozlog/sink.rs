//! The one writer of stdout: a thread that receives finished lines and
//! writes them in batches, so a slow stdout never blocks a request.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// What the writer thread is asked to do.
enum Msg {
    /// Write one finished line (its newline included).
    Line(Vec<u8>),
    /// Write everything received so far, flush, then answer.
    Flush(SyncSender<()>),
}

/// Lines queued at most; about 25 MB of typical request.summary lines.
/// Past that stdout is not keeping up, and lines are counted and dropped
/// rather than growing memory without bound or blocking requests.
const QUEUE: usize = 65_536;

/// Hands lines to the writer thread. Sending never blocks.
pub struct Sink {
    tx: SyncSender<Msg>,
    /// Lines dropped because the queue was full, not yet reported.
    dropped: AtomicU64,
}

impl Sink {
    /// Starts the writer thread over `out`. The thread lives as long as the
    /// process; `flush` is what guarantees that no line is lost at exit.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Sink> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("mozlog-writer".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(Sink {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues one finished line (newline included), or counts it as
    /// dropped when the queue is full.
    pub fn write(&self, line: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        if self.dropped.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every line queued before this call is
    /// written and the output flushed.
    pub fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(timeout);
        }
    }
}

fn write_loop(rx: Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(msg) = rx.recv() {
        handle(&mut out, msg);
        // Batch whatever else is already queued before paying for a flush.
        while let Ok(msg) = rx.try_recv() {
            handle(&mut out, msg);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

fn handle(out: &mut impl Write, msg: Msg) {
    match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
        }
        Msg::Flush(ack) => {
            let _ = out.flush();
            let _ = ack.send(());
        }
    }
}
