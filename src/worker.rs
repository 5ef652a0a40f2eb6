//! Which worker the calling thread is.
//!
//! The binary serves on one single-threaded runtime per worker, each on a
//! thread of its own (src/main.rs): a task never leaves the worker that
//! accepted its connection. State kept per worker (the upstream pool's idle
//! connections, src/pool.rs) is indexed by [`index`]. Threads that are not a
//! worker's (tests' runtimes, the blocking pool) are worker 0.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as worker `index`'s.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// The calling thread's worker (0 unless [`enter`] said otherwise).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}
