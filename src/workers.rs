//! The threads that run ListAndWatch streams. A stream owns its thread for as long as it lives;
//! a thread whose stream ended waits (blocked, no wake-ups) for the next stream instead of
//! exiting, up to [`MAX_IDLE`] of them.
//!
//! Why not a fresh thread per stream: each thread that calls into gRPC gets C++ thread-local
//! state, and under musl that state is not freed when the thread exits. Measured with the musl
//! binary: RSS grew by about 450 bytes per stream, linearly over 8,000 streams, with a thread per
//! stream; it stays flat with reused threads.

use std::io;
use std::sync::mpsc::{self, Receiver, SendError, Sender};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;

/// Idle threads kept for the next streams; the kubelet holds one stream, probes open a few.
pub const MAX_IDLE: usize = 4;
/// Stack of our threads (stream and Register threads). Rust's default is 2 MiB of address space
/// per thread, which under an address-space limit (`RLIMIT_AS`) runs out after a few dozen
/// streams; they need a few tens of KiB (a gRPC call's frames included; musl's own default for
/// gRPC's threads is 128 KiB).
pub const STACK_SIZE: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send + 'static>;

static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

fn idle() -> MutexGuard<'static, Vec<Sender<Job>>> {
    // A plain list of senders: a panic elsewhere cannot leave it inconsistent.
    IDLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `job` on an idle stream thread, or on a new one. Fails only if no thread can be made.
pub fn run(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let mut job: Job = Box::new(job);
    loop {
        let Some(worker) = idle().pop() else {
            break;
        };
        match worker.send(job) {
            Ok(()) => return Ok(()),
            // That thread is gone (its job panicked): try the next one.
            Err(SendError(back)) => job = back,
        }
    }
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("list-and-watch".into())
        .stack_size(STACK_SIZE)
        .spawn(move || work(job, &tx, &rx))
        .map(drop)
}

fn work(first: Job, me: &Sender<Job>, jobs: &Receiver<Job>) {
    first();
    loop {
        {
            let mut idle = idle();
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(me.clone());
        }
        // `me` is alive, so this only returns with a job.
        match jobs.recv() {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn threads_are_reused_and_bounded() {
        let (tx, rx) = channel();
        // Sequential jobs: each one should find the previous job's thread idle.
        let mut names = Vec::new();
        for _ in 0..20 {
            let tx = tx.clone();
            run(move || tx.send(thread::current().id()).unwrap()).unwrap();
            names.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
            // Let the worker park itself before the next job arrives.
            for _ in 0..1000 {
                if !idle().is_empty() {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        names.sort_by_key(|id| format!("{id:?}"));
        names.dedup();
        // Other tests in this binary share the pool, so allow a few distinct threads.
        assert!(
            names.len() <= MAX_IDLE + 1,
            "{} threads for 20 sequential jobs",
            names.len()
        );
        assert!(idle().len() <= MAX_IDLE);
    }
}
