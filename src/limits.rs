//! The process's resource limits that matter to RDMA pods and to us: the locked-memory limit
//! (what the runtime gives every container on this node) and the open-files limit.

use std::io;

use log::{info, warn};

use crate::sys::{self, LimitKind};

/// Below this, registering any real buffer fails (runtimes default to 64 KiB or 8 MiB).
pub const MEMLOCK_FAIL_BELOW: u64 = 64 << 20;

/// How to raise the runtime's default.
pub const MEMLOCK_FIX: &str =
    "raise the runtime's default: containerd: `systemctl edit containerd` with \
[Service] LimitMEMLOCK=infinity; CRI-O: default_ulimits = [\"memlock=-1:-1\"] in crio.conf; \
then restart the runtime and the pods";

/// What our `RLIMIT_MEMLOCK` says about RDMA in this node's containers.
#[derive(Debug)]
pub enum Memlock {
    Unlimited,
    /// Finite but at least [`MEMLOCK_FAIL_BELOW`]: large jobs may fail.
    Limited(u64),
    /// Below [`MEMLOCK_FAIL_BELOW`]: MPI/NCCL buffers cannot be registered.
    TooLow(u64),
    Unknown(io::Error),
}

impl Memlock {
    /// A sentence for logs and `diagnose`.
    pub fn message(&self) -> String {
        match self {
            Memlock::Unlimited => "unlimited: RDMA can register any buffer".into(),
            Memlock::Limited(n) => format!(
                "containers get a locked-memory limit of {}: large jobs may fail to register memory",
                size(*n)
            ),
            Memlock::TooLow(n) => format!(
                "containers get a locked-memory limit of {}: ibv_reg_mr fails for MPI/NCCL buffers",
                size(*n)
            ),
            Memlock::Unknown(e) => format!("cannot read RLIMIT_MEMLOCK: {e}"),
        }
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// This process's locked-memory limit, which is what the runtime gives every container.
pub fn memlock() -> Memlock {
    match sys::get_limit(LimitKind::Memlock) {
        Err(e) => Memlock::Unknown(e),
        Ok(l) => match l.soft {
            None => Memlock::Unlimited,
            Some(n) if n < MEMLOCK_FAIL_BELOW => Memlock::TooLow(n),
            Some(n) => Memlock::Limited(n),
        },
    }
}

/// Logged once at daemon start: RDMA pods on this node would inherit the same limit.
pub fn warn_memlock() {
    let m = memlock();
    if !matches!(m, Memlock::Unlimited) {
        warn!("memlock: {}; fix: {MEMLOCK_FIX}", m.message());
    }
}

/// Descriptors the daemon needs at the least: gRPC's own (epoll, wakeup pipes, the listener),
/// inotify, signalfd, eventfds, a connection per client and a few for each directory scan.
/// gRPC aborts the process when it runs out; we refuse to start instead.
pub const MIN_OPEN_FILES: u64 = 64;

/// Raises the open-files soft limit to the hard limit; refuses (with why) when even that is
/// below [`MIN_OPEN_FILES`].
pub fn raise_open_files() -> Result<u64, String> {
    let l = sys::get_limit(LimitKind::Nofile)
        .map_err(|e| format!("cannot read the open-files limit: {e}"))?;
    if l.soft != l.hard {
        match sys::set_soft_limit(LimitKind::Nofile, l.hard) {
            Ok(()) => info!(
                "open-files limit raised from {} to {}",
                fmt_limit(l.soft),
                fmt_limit(l.hard)
            ),
            Err(e) => warn!(
                "cannot raise the open-files limit to {}: {e}",
                fmt_limit(l.hard)
            ),
        }
    }
    let now = sys::get_limit(LimitKind::Nofile)
        .map_err(|e| format!("cannot read the open-files limit: {e}"))?;
    match now.soft {
        Some(n) if n < MIN_OPEN_FILES => Err(format!(
            "the open-files limit is {n} (hard limit {}): at least {MIN_OPEN_FILES} are needed to serve; raise it (ulimit -n, LimitNOFILE=)",
            fmt_limit(now.hard)
        )),
        n => Ok(n.unwrap_or(u64::MAX)),
    }
}

fn fmt_limit(v: Option<u64>) -> String {
    v.map_or("unlimited".into(), |n| n.to_string())
}
