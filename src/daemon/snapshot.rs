//! One reading of the host per change, shared: every resource the daemon serves (and every
//! front-end) assesses the same immutable [`Snapshot`], and the gRPC handlers answer from the
//! daemon's latest assessment instead of reading `/dev` and sysfs on gRPC's completion-queue
//! thread. The loop marks the snapshot old at each wake-up ([`HostReader::invalidate`]); the
//! first unit that needs the host then reads it, and the others take the same reading.

use std::path::PathBuf;
use std::sync::Arc;

use log::{debug, info, warn};

use crate::config::Config;
use crate::host::nodes::{Inventory, Selection};
use crate::host::{self, sysfs, Host};

/// One reading of the host: the device nodes and HCAs, or, when `/dev` could not be listed,
/// the HCAs alone and why (the resources then advertise no node, and Allocate says why).
#[derive(Debug)]
pub struct Snapshot {
    pub host: Arc<Host>,
    /// Why device discovery failed (an unreadable device directory, too many open files).
    pub error: Option<String>,
}

/// Reads the host when asked and the last reading is old; logs lasting problems once.
pub struct HostReader {
    root: PathBuf,
    sysfs: PathBuf,
    selection: Selection,
    latest: Option<Arc<Snapshot>>,
    stale: bool,
    /// The last discovery error, so a lasting one is logged at warn once.
    last_error: Option<String>,
    /// What sysfs could not tell at the last reading, so it is logged (at debug) once.
    last_notes: Vec<String>,
    /// Readings taken since start.
    reads: u64,
}

impl HostReader {
    pub fn new(cfg: &Config) -> HostReader {
        HostReader {
            root: cfg.host_root.clone(),
            sysfs: cfg.sysfs.clone(),
            selection: cfg.selection(),
            latest: None,
            stale: true,
            last_error: None,
            last_notes: Vec::new(),
            reads: 0,
        }
    }

    /// Something may have changed (the loop woke up): the next [`HostReader::get`] reads again.
    pub fn invalidate(&mut self) {
        self.stale = true;
    }

    /// Readings taken since start.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// The host as read since the last [`HostReader::invalidate`]: read now if not yet.
    pub fn get(&mut self) -> Arc<Snapshot> {
        match &self.latest {
            Some(s) if !self.stale => Arc::clone(s),
            _ => {
                let s = Arc::new(self.read());
                self.latest = Some(Arc::clone(&s));
                self.stale = false;
                s
            }
        }
    }

    fn read(&mut self) -> Snapshot {
        self.reads += 1;
        match host::scan(&self.root, &self.sysfs, self.selection) {
            Ok(h) => {
                // Trace: every health reading reads the host.
                log::trace!(
                    "read the host (reading {}): {} node(s), {} HCA(s)",
                    self.reads,
                    h.nodes.nodes.len(),
                    h.hcas.list.len()
                );
                if self.last_notes != h.hcas.notes {
                    for note in &h.hcas.notes {
                        debug!("sysfs: cannot read {note}; that much stays unknown");
                    }
                    self.last_notes.clone_from(&h.hcas.notes);
                }
                if self.last_error.take().is_some() {
                    info!("device discovery works again");
                }
                Snapshot {
                    host: Arc::new(h),
                    error: None,
                }
            }
            Err(e) => {
                let text = e.to_string();
                if self.last_error.as_deref() == Some(text.as_str()) {
                    debug!("device discovery still failing: {text}");
                } else {
                    warn!("device discovery failed: {text}; advertising no device nodes");
                    self.last_error = Some(text.clone());
                }
                Snapshot {
                    host: Arc::new(Host {
                        nodes: Inventory::default(),
                        hcas: sysfs::read(&self.sysfs),
                    }),
                    error: Some(text),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::{self, MockHca};
    use std::fs;

    #[test]
    fn reads_once_per_change_and_says_why_discovery_failed() {
        let base = std::env::temp_dir().join(format!("rdma-snapshot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let sys = base.join("sys");
        mock::add_hca(&sys, Some(&base.join("dev")), &MockHca::connectx(0)).unwrap();
        let cfg = Config {
            host_root: base.clone(),
            sysfs: sys,
            ..Config::default()
        };
        let mut r = HostReader::new(&cfg);
        let a = r.get();
        let b = r.get();
        assert!(
            Arc::ptr_eq(&a, &b),
            "one reading until something may have changed"
        );
        assert_eq!(r.reads(), 1);
        assert_eq!(a.host.nodes.nodes.len(), 1);
        assert_eq!(a.host.hcas.list.len(), 1);
        assert!(a.error.is_none());

        // /dev/infiniband becomes a file: no nodes, the HCAs still, and the reason.
        fs::remove_dir_all(base.join("dev/infiniband")).unwrap();
        fs::write(base.join("dev/infiniband"), b"").unwrap();
        assert!(
            Arc::ptr_eq(&r.get(), &b),
            "not read again before invalidate"
        );
        r.invalidate();
        let c = r.get();
        assert_eq!(r.reads(), 2);
        assert!(c.host.nodes.nodes.is_empty());
        assert_eq!(c.host.hcas.list.len(), 1);
        assert!(
            c.error.as_deref().is_some_and(|e| e.contains("infiniband")),
            "{c:?}"
        );
        fs::remove_dir_all(&base).unwrap();
    }
}
