//! Drives grpcio's futures from plain threads, without an async runtime: a [`Signal`] is both a
//! `Waker` (grpcio's completion-queue threads call it) and something a thread can sleep on.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// A sticky wake-up flag: `wake` sets it, `wait` sleeps until it is set and clears it.
#[derive(Default)]
pub struct Signal {
    raised: Mutex<bool>,
    cond: Condvar,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    fn flag(&self) -> MutexGuard<'_, bool> {
        // The flag is a plain bool: a panic elsewhere cannot leave it inconsistent.
        self.raised.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn raise(&self) {
        *self.flag() = true;
        self.cond.notify_all();
    }

    /// Sleeps until raised (or `deadline` passes); returns whether it was raised.
    pub fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut raised = self.flag();
        while !*raised {
            match deadline {
                None => {
                    raised = self
                        .cond
                        .wait(raised)
                        .unwrap_or_else(PoisonError::into_inner)
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    raised = self
                        .cond
                        .wait_timeout(raised, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        *raised = false;
        true
    }

    pub fn waker(self: &Arc<Self>) -> Waker {
        Waker::from(Arc::clone(self))
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.raise();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raise();
    }
}

/// Runs `fut` to completion on this thread, or gives up after `timeout` (`None`: never).
pub fn block_on<F: Future>(fut: F, timeout: Option<Duration>) -> Option<F::Output> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let signal = Signal::new();
    let waker = signal.waker();
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        if !signal.wait_until(deadline) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_ready_and_timeout() {
        assert_eq!(block_on(async { 7 }, None), Some(7));
        let never = std::future::pending::<()>();
        assert_eq!(block_on(never, Some(Duration::from_millis(20))), None);
    }

    #[test]
    fn signal_wakes_other_thread() {
        let s = Signal::new();
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || {
            s2.wait_until(Some(Instant::now() + Duration::from_secs(10)))
        });
        s.waker().wake();
        assert!(t.join().unwrap());
    }
}
