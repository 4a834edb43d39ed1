//! The threads that run ListAndWatch streams. A stream owns its thread for as long as it lives;
//! a thread whose stream ended waits (blocked, no wake-ups) for the next stream instead of
//! exiting, up to [`MAX_IDLE`] of them, until it has been idle for [`IDLE_EXIT`].
//!
//! Why not a fresh thread per stream: each thread that calls into gRPC gets C++ thread-local
//! state, and under musl that state is not freed when the thread exits. Measured with the musl
//! binary: RSS grew by about 450 bytes per stream, linearly over 8,000 streams, with a thread per
//! stream; it stays flat with reused threads.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SendError, Sender};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

/// Idle threads kept for the next streams; the kubelet holds one stream, probes open a few.
pub const MAX_IDLE: usize = 4;
/// Stack of our threads (stream and Register threads). Rust's default is 2 MiB of address space
/// per thread, which under an address-space limit (`RLIMIT_AS`) runs out after a few dozen
/// streams; they need a few tens of KiB (a gRPC call's frames included; musl's own default for
/// gRPC's threads is 128 KiB).
pub const STACK_SIZE: usize = 256 * 1024;

/// An idle thread exits after this long without a stream, so a burst of probes leaves no
/// threads behind for good (each exit costs musl's few hundred bytes of gRPC thread-locals once
/// per burst, not once per stream).
#[cfg(not(test))]
const IDLE_EXIT: Duration = Duration::from_secs(30);
#[cfg(test)]
const IDLE_EXIT: Duration = Duration::from_millis(300);

type Job = Box<dyn FnOnce() + Send + 'static>;
/// A job for an idle thread, or `None`: exit now.
type Order = Option<Job>;

/// Idle threads: an ID each (to take itself off the list when it exits) and where to send it a
/// job.
static IDLE: Mutex<Vec<(usize, Sender<Order>)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
/// Jobs handed out and not finished: streams under way (they hold gRPC calls).
static BUSY: AtomicUsize = AtomicUsize::new(0);

/// How many jobs are handed out and not finished yet.
pub fn busy() -> usize {
    BUSY.load(Ordering::SeqCst)
}

/// Counts a job as finished when dropped, even if the job panicked.
struct Finished;

impl Drop for Finished {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

fn idle() -> MutexGuard<'static, Vec<(usize, Sender<Order>)>> {
    // A plain list of senders: a panic elsewhere cannot leave it inconsistent.
    IDLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `job` on an idle stream thread, or on a new one. Fails only if no thread can be made.
pub fn run(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    // Counted from now: no moment where a stream is on its way to a thread and not counted.
    BUSY.fetch_add(1, Ordering::SeqCst);
    let mut order: Order = Some(Box::new(job));
    loop {
        let Some((_, worker)) = idle().pop() else {
            break;
        };
        match worker.send(order) {
            Ok(()) => return Ok(()),
            // That thread is gone (its job panicked): try the next one.
            Err(SendError(back)) => order = back,
        }
    }
    let (tx, rx) = mpsc::channel();
    let spawned = thread::Builder::new()
        .name("list-and-watch".into())
        .stack_size(STACK_SIZE)
        .spawn(move || work(order, &tx, &rx));
    if spawned.is_err() {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
    spawned.map(drop)
}

/// Ends every idle thread now (gRPC is being shut down: no stream will come for a while).
pub fn release_idle() {
    for (_, worker) in idle().drain(..) {
        // A thread that is gone already needs no telling.
        let _ = worker.send(None);
    }
}

fn work(first: Order, me: &Sender<Order>, jobs: &Receiver<Order>) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut next = first;
    loop {
        let Some(job) = next.take() else {
            return;
        };
        // Counted until this thread is idle (on the list, where `release_idle` finds it) or on
        // its way out, not merely until the job returned.
        let done = Finished;
        job();
        {
            let mut idle = idle();
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push((id, me.clone()));
        }
        drop(done);
        // `me` is alive, so this returns with a job or after the idle time.
        next = match jobs.recv_timeout(IDLE_EXIT) {
            Ok(order) => order,
            Err(RecvTimeoutError::Timeout) => {
                let mut idle = idle();
                match idle.iter().position(|(i, _)| *i == id) {
                    Some(at) => {
                        idle.remove(at);
                        return;
                    }
                    // Taken off the list by `run`: its job is on the way.
                    None => jobs.recv().unwrap_or(None),
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    /// The pool is global: one test releasing idle threads would break another's reuse count.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn threads_are_reused_and_bounded() {
        let _serial = serial();
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

    #[test]
    fn released_idle_threads_exit_at_once() {
        let _serial = serial();
        use std::cell::RefCell;
        use std::sync::Arc;
        thread_local! {
            // Dropped when the thread exits, not when the job ends.
            static UNTIL_EXIT: RefCell<Option<Arc<()>>> = const { RefCell::new(None) };
        }
        let (tx, rx) = channel();
        let alive = Arc::new(());
        for _ in 0..2 {
            let (tx, mark) = (tx.clone(), Arc::clone(&alive));
            run(move || {
                UNTIL_EXIT.with(|k| *k.borrow_mut() = Some(mark));
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // Well before IDLE_EXIT would end them; again and again, since a thread parks itself
        // only after its job returned.
        let start = std::time::Instant::now();
        while Arc::strong_count(&alive) > 1 && start.elapsed() < IDLE_EXIT / 3 {
            release_idle();
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(Arc::strong_count(&alive), 1, "threads still alive");
    }

    #[test]
    fn a_job_counts_as_busy_until_it_returns() {
        let _serial = serial();
        let before = busy();
        let (go, wait) = channel::<()>();
        let (done, finished) = channel();
        run(move || {
            let _ = wait.recv();
            done.send(()).unwrap();
        })
        .unwrap();
        assert_eq!(busy(), before + 1);
        go.send(()).unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        let start = std::time::Instant::now();
        while busy() > before && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(busy(), before);
    }

    #[test]
    fn idle_threads_exit_after_a_while() {
        let _serial = serial();
        let (tx, rx) = channel();
        for _ in 0..3 {
            let tx = tx.clone();
            run(move || tx.send(()).unwrap()).unwrap();
        }
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // Other tests share the pool: wait until every idle thread has timed out.
        let mut empty = false;
        for _ in 0..200 {
            if idle().is_empty() {
                empty = true;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        assert!(empty, "{} idle threads left", idle().len());
    }
}
