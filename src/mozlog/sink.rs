//! The one writer of stdout: a thread that receives finished lines and
//! writes them in batches, so a slow stdout never blocks a request.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::Duration;

/// What the writer thread is asked to do.
enum Msg {
    /// Write one finished line (its newline included).
    Line(Vec<u8>),
    /// Write everything received so far, flush, then answer.
    Flush(SyncSender<()>),
}

/// Hands lines to the writer thread. Sending never blocks.
pub struct Sink {
    tx: Sender<Msg>,
}

impl Sink {
    /// Starts the writer thread over `out`. The thread lives as long as the
    /// process; `flush` is what guarantees that no line is lost at exit.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Sink> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("mozlog-writer".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(Sink { tx })
    }

    /// Queues one finished line (newline included).
    pub fn write(&self, line: Vec<u8>) {
        let _ = self.tx.send(Msg::Line(line));
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
