//! gRPC C-core, running only while a resource serves or registers.
//!
//! Once initialised, gRPC keeps two timer threads that wake at least once a second each, plus
//! executor and poller threads, whether or not anything uses it. With no kubelet there is
//! nothing to serve (the kubelet dials us only after our Register), so the daemon stops its
//! servers and, after [`LINGER`], shuts gRPC down completely: no threads, no wake-ups, until a
//! kubelet is back. The linger keeps a kubelet restart (seconds) from tearing gRPC down and
//! starting it again.
//!
//! grpcio starts gRPC (`grpc_init`) when it builds an `Environment` but never ends it; we call
//! `grpc_shutdown` ourselves, only after the environment's completion queue has drained and its
//! thread has exited, so no gRPC object of ours is left.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{EnvBuilder, Environment};
use log::{debug, info, warn};

use crate::sys::{self, EventFd};
use crate::workers;

/// How long gRPC stays up after the last server stopped and the last Register ended.
pub const LINGER: Duration = Duration::from_secs(5);
/// How long the main thread waits for the completion-queue thread to drain and exit.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// When the environment is still shared (a Register thread finishing), look again this soon.
const BUSY_RETRY: Duration = Duration::from_millis(200);

/// gRPC's environment while needed. Main thread only.
pub struct Grpc {
    env: Option<Arc<Environment>>,
    /// Notified by the completion-queue thread as it exits (its queue drained and destroyed).
    drained: Arc<EventFd>,
    /// When to shut gRPC down, if nothing needs it before then.
    shutdown_at: Option<Instant>,
    /// gRPC was started this many times (the first start and every restart after a shutdown).
    pub starts: u64,
}

impl Grpc {
    pub fn new() -> std::io::Result<Grpc> {
        Ok(Grpc {
            env: None,
            drained: Arc::new(EventFd::new()?),
            shutdown_at: None,
            starts: 0,
        })
    }

    /// The environment, starting gRPC if it is not running.
    pub fn env(&mut self) -> Arc<Environment> {
        self.shutdown_at = None;
        if let Some(env) = &self.env {
            return Arc::clone(env);
        }
        let drained = Arc::clone(&self.drained);
        // gRPC sizes its timer shards and thread pools from the CPUs it counts in
        // EnvBuilder::new() (and keeps that count): one is plenty for a device plugin, and each
        // more costs idle wake-ups.
        let env = Arc::new(
            sys::with_one_cpu(EnvBuilder::new)
                .cq_count(1)
                .name_prefix("grpc")
                .before_stop(move || drained.notify())
                .build(),
        );
        self.starts += 1;
        if self.starts > 1 {
            info!("gRPC started again");
        }
        self.env = Some(Arc::clone(&env));
        env
    }

    /// Whether gRPC is running (an environment exists).
    pub fn running(&self) -> bool {
        self.env.is_some()
    }

    /// Called after every turn of the loop with whether any resource serves or registers:
    /// schedules, postpones or carries out the shutdown.
    pub fn settle(&mut self, needed: bool, now: Instant) {
        if needed || self.env.is_none() {
            self.shutdown_at = None;
            return;
        }
        match self.shutdown_at {
            None => self.shutdown_at = Some(now + LINGER),
            Some(t) if t <= now => self.shut_down(now),
            Some(_) => {}
        }
    }

    /// When [`Grpc::settle`] wants to run next.
    pub fn deadline(&self) -> Option<Instant> {
        self.shutdown_at
    }

    fn shut_down(&mut self, now: Instant) {
        if workers::busy() > 0 {
            // A stream thread still holds its call: after the server stopped, it ends soon.
            debug!("stream threads still running: shutting gRPC down later");
            self.shutdown_at = Some(now + BUSY_RETRY);
            return;
        }
        let Some(env) = self.env.take() else {
            return;
        };
        let env = match Arc::try_unwrap(env) {
            Ok(env) => env,
            Err(shared) => {
                // A Register thread (or a server being dropped) still holds it.
                debug!("gRPC still in use: shutting it down later");
                self.env = Some(shared);
                self.shutdown_at = Some(now + BUSY_RETRY);
                return;
            }
        };
        self.shutdown_at = None;
        // A notification left from an earlier environment must not count for this one.
        self.drained.drain();
        // gRPC short of threads may hang in its teardown: a SIGTERM meanwhile must still end us.
        let drained = Arc::clone(&self.drained);
        sys::stoppable(move || {
            // Shuts the completion queue down; its thread exits once every call on it is done.
            drop(env);
            match sys::poll_readable(&[drained.as_raw_fd()], Some(DRAIN_WAIT)) {
                Ok(ready) if ready[0] => {
                    drained.drain();
                    // Idle stream threads hold gRPC's thread-local state: they go first.
                    workers::release_idle();
                    sys::grpc_shutdown();
                    if sys::grpc_is_initialized() {
                        info!("nothing to serve: gRPC released (it ends its own work, then its threads)");
                    } else {
                        info!("nothing to serve: gRPC shut down (no threads, no timers) until a kubelet needs it");
                    }
                }
                Ok(_) => warn!(
                    "gRPC's completion queue did not drain within {DRAIN_WAIT:?}: leaving gRPC initialised"
                ),
                Err(e) => {
                    warn!("cannot wait for gRPC's completion queue: {e}; leaving gRPC initialised")
                }
            }
        });
    }
}
