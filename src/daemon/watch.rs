//! Turns inotify records into the few changes the plugin acts on: the kubelet restarted
//! (`kubelet.sock` created), our socket vanished, or device nodes came or went.
//!
//! Watched: the plugin dir, `<root>/dev` (for `infiniband` and `knem` appearing or vanishing,
//! e.g. a driver loaded late) and `<root>/dev/infiniband`. A directory that does not exist yet
//! is watched once it does; until then, and when inotify cannot be had at all (fs.inotify limits),
//! the caller falls back to polling (see [`Watcher::complete`]).

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::host::nodes::{INFINIBAND_DIR, KNEM_NODE};
use crate::sys::{Inotify, InotifyEvent};

/// The kubelet's own socket in the plugin dir; created anew on every kubelet start.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

const DIR_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// What a batch of events means; several may hold at once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub kubelet_restarted: bool,
    pub socket_removed: bool,
    pub devices: bool,
    /// The plugin dir exists (again) and is watched now: serving there may work at last.
    pub plugin_dir_appeared: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.kubelet_restarted || self.socket_removed || self.devices || self.plugin_dir_appeared
    }

    fn merge(&mut self, other: Changes) {
        self.kubelet_restarted |= other.kubelet_restarted;
        self.socket_removed |= other.socket_removed;
        self.devices |= other.devices;
        self.plugin_dir_appeared |= other.plugin_dir_appeared;
    }
}

struct Target {
    path: PathBuf,
    wd: Option<libc::c_int>,
}

/// The inotify watches of the plugin dir, `<root>/dev` and `<root>/dev/infiniband`.
pub struct Watcher {
    inotify: Option<Inotify>,
    plugin_dir: Target,
    dev_dir: Target,
    ib_dir: Target,
    /// Our sockets' names (one per resource served).
    socket_names: Vec<String>,
}

impl Watcher {
    /// `use_inotify = false` (flag `--poll`) polls everything, for filesystems without inotify.
    pub fn new(
        plugin_dir: &Path,
        socket_names: &[String],
        host_root: &Path,
        use_inotify: bool,
    ) -> Watcher {
        let inotify = if !use_inotify {
            None
        } else {
            match Inotify::new() {
                Ok(i) => Some(i),
                Err(e) => {
                    warn!("inotify unavailable ({e}; see fs.inotify.max_user_instances): falling back to polling");
                    None
                }
            }
        };
        let target = |path: PathBuf| Target { path, wd: None };
        let mut w = Watcher {
            inotify,
            plugin_dir: target(plugin_dir.to_path_buf()),
            dev_dir: target(host_root.join("dev")),
            ib_dir: target(host_root.join(INFINIBAND_DIR)),
            socket_names: socket_names.to_vec(),
        };
        // What exists now is scanned at start anyway; only the watches matter here.
        let _ = w.refresh();
        w
    }

    /// The descriptor to poll, if inotify is in use.
    pub fn fd(&self) -> Option<RawFd> {
        self.inotify.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// True when every directory is watched, so no polling is needed.
    pub fn complete(&self) -> bool {
        self.inotify.is_some() && self.targets().iter().all(|t| t.wd.is_some())
    }

    /// True when the plugin dir is watched (all a resting daemon needs: `kubelet.sock` appearing).
    pub fn watches_plugin_dir(&self) -> bool {
        self.inotify.is_some() && self.plugin_dir.wd.is_some()
    }

    fn targets(&self) -> [&Target; 3] {
        [&self.plugin_dir, &self.dev_dir, &self.ib_dir]
    }

    /// Adds the watches that are missing (their directory may exist by now). A watch added now
    /// counts as a change: anything may have happened there before it existed.
    pub fn refresh(&mut self) -> Changes {
        let mut changes = Changes::default();
        let Some(inotify) = &self.inotify else {
            return changes;
        };
        let plugin_wd = self.plugin_dir.wd;
        for t in [&mut self.plugin_dir, &mut self.dev_dir, &mut self.ib_dir] {
            if t.wd.is_some() {
                continue;
            }
            match inotify.add_watch(&t.path, DIR_EVENTS | libc::IN_ONLYDIR) {
                Ok(wd) => {
                    debug!("watching {}", t.path.display());
                    t.wd = Some(wd);
                    changes.devices = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    warn!(
                        "cannot watch {} ({e}; see fs.inotify.max_user_watches): polling it",
                        t.path.display()
                    );
                }
                Err(e) => debug!("cannot watch {} yet: {e}", t.path.display()),
            }
        }
        changes.plugin_dir_appeared = plugin_wd.is_none() && self.plugin_dir.wd.is_some();
        changes
    }

    /// Reads and classifies every queued event.
    pub fn read(&mut self) -> Changes {
        let events = match self.inotify.as_ref().map(Inotify::read_events) {
            None => return Changes::default(),
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!("reading inotify events failed: {e}; falling back to polling");
                self.inotify = None;
                return Changes {
                    devices: true,
                    ..Changes::default()
                };
            }
        };
        let mut changes = Changes::default();
        for ev in &events {
            self.classify(ev, &mut changes);
        }
        changes.merge(self.refresh());
        changes
    }

    fn classify(&mut self, ev: &InotifyEvent, changes: &mut Changes) {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: assume the worst of each kind.
            debug!("inotify queue overflowed");
            changes.devices = true;
            changes.socket_removed = true;
            changes.kubelet_restarted = true;
            return;
        }
        let gone = ev.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0;
        let name = ev.name();
        let created = ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
        let removed = ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0;
        if Some(ev.wd) == self.plugin_dir.wd {
            if gone {
                self.forget(ev.wd);
                changes.socket_removed = true;
            } else if created && name == OsStr::new(KUBELET_SOCKET) {
                changes.kubelet_restarted = true;
            } else if (removed || created)
                && self.socket_names.iter().any(|n| name == OsStr::new(n))
            {
                // Deleted, or something moved over it: either way it may no longer be ours.
                changes.socket_removed = true;
            }
        } else if Some(ev.wd) == self.dev_dir.wd {
            if gone {
                self.forget(ev.wd);
                changes.devices = true;
            } else if name == OsStr::new("infiniband")
                || Path::new("dev").join(name) == Path::new(KNEM_NODE)
            {
                changes.devices = true;
                if removed && name == OsStr::new("infiniband") {
                    self.forget_ib();
                }
            }
        } else if Some(ev.wd) == self.ib_dir.wd {
            if gone {
                self.forget(ev.wd);
            }
            changes.devices = true;
        }
    }

    fn forget(&mut self, wd: libc::c_int) {
        for t in [&mut self.plugin_dir, &mut self.dev_dir, &mut self.ib_dir] {
            if t.wd == Some(wd) {
                t.wd = None;
            }
        }
    }

    fn forget_ib(&mut self) {
        if let (Some(wd), Some(inotify)) = (self.ib_dir.wd.take(), &self.inotify) {
            // Usually already gone with the directory; EINVAL then is expected.
            let _ = inotify.rm_watch(wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    fn wait_changes(w: &mut Watcher) -> Changes {
        let fd = w.fd().unwrap();
        let mut all = Changes::default();
        // Collect until the queue stays quiet for a moment.
        while crate::sys::poll_readable(&[fd], Some(Duration::from_millis(200))).unwrap()[0] {
            all.merge(w.read());
        }
        all
    }

    #[test]
    fn classifies_kubelet_socket_devices_and_late_directories() {
        let base = std::env::temp_dir().join(format!("rdma-watch-{}", std::process::id()));
        let plugin_dir = base.join("plugins");
        let root = base.join("root");
        fs::create_dir_all(&plugin_dir).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        let mut w = Watcher::new(&plugin_dir, &["rdma.sock".to_string()], &root, true);
        assert!(!w.complete(), "dev/infiniband does not exist yet");

        fs::write(plugin_dir.join("kubelet.sock"), b"").unwrap();
        let c = wait_changes(&mut w);
        assert!(
            c.kubelet_restarted && !c.devices && !c.socket_removed,
            "{c:?}"
        );

        // Our socket's name appearing may be something moved over ours: checked by the caller.
        fs::write(plugin_dir.join("rdma.sock"), b"").unwrap();
        assert!(wait_changes(&mut w).socket_removed);
        fs::write(plugin_dir.join("other.sock"), b"").unwrap();
        assert!(!wait_changes(&mut w).any());
        fs::remove_file(plugin_dir.join("rdma.sock")).unwrap();
        let c = wait_changes(&mut w);
        assert!(c.socket_removed && !c.kubelet_restarted, "{c:?}");

        // The driver loads late: the directory appears, then nodes in it.
        fs::create_dir_all(root.join("dev/infiniband")).unwrap();
        assert!(wait_changes(&mut w).devices);
        assert!(w.complete());
        fs::write(root.join("dev/infiniband/uverbs0"), b"").unwrap();
        assert!(wait_changes(&mut w).devices);
        fs::write(root.join("dev/knem"), b"").unwrap();
        assert!(wait_changes(&mut w).devices);
        fs::write(root.join("dev/tty9"), b"").unwrap();
        assert!(!wait_changes(&mut w).any());

        // The driver unloads: the directory goes, and comes back.
        fs::remove_dir_all(root.join("dev/infiniband")).unwrap();
        assert!(wait_changes(&mut w).devices);
        assert!(!w.complete());
        fs::create_dir_all(root.join("dev/infiniband")).unwrap();
        assert!(wait_changes(&mut w).devices);
        assert!(w.complete());

        // The plugin dir goes away and comes back (a kubelet reinstalled).
        fs::remove_dir_all(&plugin_dir).unwrap();
        assert!(wait_changes(&mut w).socket_removed);
        assert!(!w.complete());
        assert!(!w.refresh().plugin_dir_appeared);
        fs::create_dir_all(&plugin_dir).unwrap();
        assert!(w.refresh().plugin_dir_appeared);
        assert!(w.complete());
        fs::remove_dir_all(&base).unwrap();
    }
}
