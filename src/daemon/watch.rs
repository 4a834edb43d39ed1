//! Turns inotify records into the few changes the plugin acts on: the kubelet restarted
//! (`kubelet.sock` created), our socket vanished, device nodes came or went, or something
//! touched our CDI specs.
//!
//! Watched: the plugin dir, `<root>/dev` (for `infiniband` and `knem` appearing or vanishing,
//! e.g. a driver loaded late), `<root>/dev/infiniband` and, with `--cdi`, the CDI dir; and the
//! parents of the plugin dir and the CDI dir (`<root>/dev` is `infiniband`'s), so that a
//! directory deleted and made again (a kubelet or runtime reinstall) is an event, not a poll.
//! A directory that does not exist yet is watched once it does. Only where neither a directory
//! nor its parent can be watched (no inotify, fs.inotify limits, a parent missing too) does the
//! caller fall back to polling (see [`Watcher::complete`]).

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::host::nodes::{INFINIBAND_DIR, KNEM_NODE};
use crate::kubelet::registration::KUBELET_SOCKET;
use crate::sys::{Inotify, InotifyEvent};

const DIR_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;
/// In the CDI dir a spec can also be truncated or rewritten in place.
const CDI_EVENTS: u32 = DIR_EVENTS | libc::IN_MODIFY | libc::IN_CLOSE_WRITE;
/// In a parent, only its child coming or going matters.
const PARENT_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
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
    /// One of our CDI specs, or the CDI dir itself, was touched: check the specs.
    pub cdi: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.kubelet_restarted
            || self.socket_removed
            || self.devices
            || self.plugin_dir_appeared
            || self.cdi
    }

    fn merge(&mut self, other: Changes) {
        self.kubelet_restarted |= other.kubelet_restarted;
        self.socket_removed |= other.socket_removed;
        self.devices |= other.devices;
        self.plugin_dir_appeared |= other.plugin_dir_appeared;
        self.cdi |= other.cdi;
    }
}

/// The directories watched, each for its own reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    PluginDir,
    PluginParent,
    Dev,
    Infiniband,
    Cdi,
    CdiParent,
}

impl Role {
    fn mask(self) -> u32 {
        match self {
            Role::PluginParent | Role::CdiParent => PARENT_EVENTS,
            Role::Cdi => CDI_EVENTS,
            _ => DIR_EVENTS,
        }
    }

    /// The role of this one's parent, whose watch sees it come and go.
    fn parent(self) -> Option<Role> {
        match self {
            Role::PluginDir => Some(Role::PluginParent),
            Role::Infiniband => Some(Role::Dev),
            Role::Cdi => Some(Role::CdiParent),
            _ => None,
        }
    }
}

struct Target {
    role: Role,
    path: PathBuf,
    wd: Option<libc::c_int>,
    /// The inotify limit was reported for it (once, not at every batch).
    warned: bool,
}

/// The inotify watches of the plugin dir, `<root>/dev`, `<root>/dev/infiniband`, the CDI dir,
/// and the parents of the plugin and CDI dirs.
pub struct Watcher {
    inotify: Option<Inotify>,
    targets: Vec<Target>,
    /// Our sockets' names (one per resource served).
    socket_names: Vec<String>,
    /// Our CDI specs' file names (with `--cdi`).
    spec_names: Vec<String>,
    /// A directory we serve in that was deleted while still mounted here (see
    /// [`Watcher::stale_mount`]).
    stale: Option<PathBuf>,
    /// When to look again whether the plugin dir or the CDI dir was deleted: a host's `rm -rf`
    /// of a directory another mount holds gives no event for the directory itself, only for
    /// the files in it, so a few looks follow each such event (no timer otherwise).
    rechecks: Vec<std::time::Instant>,
}

/// Where the kubelet's and the runtime's directories are, and what of ours lives in them.
pub struct Paths<'a> {
    pub plugin_dir: &'a Path,
    pub socket_names: &'a [String],
    pub host_root: &'a Path,
    /// The CDI dir and our specs' file names there, with `--cdi`.
    pub cdi: Option<(&'a Path, Vec<String>)>,
}

impl Watcher {
    /// `use_inotify = false` (flag `--poll`) polls everything, for filesystems without inotify.
    pub fn new(paths: Paths<'_>, use_inotify: bool) -> Watcher {
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
        let mut targets = Vec::new();
        let mut add = |role, path: PathBuf| {
            targets.push(Target {
                role,
                path,
                wd: None,
                warned: false,
            })
        };
        add(Role::PluginDir, paths.plugin_dir.to_path_buf());
        if let Some(parent) = paths.plugin_dir.parent() {
            add(Role::PluginParent, parent.to_path_buf());
        }
        add(Role::Dev, paths.host_root.join("dev"));
        add(Role::Infiniband, paths.host_root.join(INFINIBAND_DIR));
        let mut spec_names = Vec::new();
        if let Some((dir, names)) = paths.cdi {
            add(Role::Cdi, dir.to_path_buf());
            if let Some(parent) = dir.parent() {
                add(Role::CdiParent, parent.to_path_buf());
            }
            spec_names = names;
        }
        let mut w = Watcher {
            inotify,
            targets,
            socket_names: paths.socket_names.to_vec(),
            spec_names,
            stale: None,
            rechecks: Vec::new(),
        };
        // What exists now is scanned at start anyway; only the watches matter here.
        let _ = w.refresh();
        w
    }

    /// The descriptor to poll, if inotify is in use.
    pub fn fd(&self) -> Option<RawFd> {
        self.inotify.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn target(&self, role: Role) -> Option<&Target> {
        self.targets.iter().find(|t| t.role == role)
    }

    /// Whether an event will tell when `role`'s directory changes or comes into being: it is
    /// watched, or it is missing and its parent is.
    fn covered(&self, role: Role) -> bool {
        let watched = |r: Role| self.target(r).is_some_and(|t| t.wd.is_some());
        self.inotify.is_some()
            && (watched(role)
                || role.parent().is_some_and(|p| {
                    watched(p) && !self.target(role).is_some_and(|t| t.path.is_dir())
                }))
    }

    /// True when every change is an event, so no polling is needed.
    pub fn complete(&self) -> bool {
        self.targets
            .iter()
            .filter(|t| t.role.parent().is_some() || t.role == Role::Dev)
            .all(|t| self.covered(t.role))
    }

    /// True when `kubelet.sock` appearing is an event (all a resting daemon needs), also while
    /// the plugin dir itself is missing but its parent is watched.
    pub fn watches_plugin_dir(&self) -> bool {
        self.covered(Role::PluginDir)
    }

    /// The plugin dir or the CDI dir, deleted on the host while this process still has it
    /// mounted (a hostPath in a pod: the bind mount keeps the deleted directory, and the one the
    /// host makes again is out of reach). Nothing written there reaches the kubelet or the
    /// runtime again, and only a new container gets the new directory: the daemon exits.
    pub fn stale_mount(&self) -> Option<&Path> {
        self.stale.as_deref()
    }

    /// Adds the watches that are missing (their directory may exist by now). A watch added now
    /// counts as a change: anything may have happened there before it existed.
    pub fn refresh(&mut self) -> Changes {
        let mut changes = Changes::default();
        self.look_for_stale_mounts();
        let Some(inotify) = &self.inotify else {
            return changes;
        };
        for t in self.targets.iter_mut().filter(|t| t.wd.is_none()) {
            if matches!(t.role, Role::PluginDir | Role::Cdi) && deleted_dir(&t.path) {
                self.stale = Some(t.path.clone());
                continue;
            }
            // IN_MASK_ADD: two roles on one directory (the CDI dir's parent may be the plugin
            // dir's) share one watch, with both masks.
            let mask = t.role.mask() | libc::IN_ONLYDIR | libc::IN_MASK_ADD;
            match inotify.add_watch(&t.path, mask) {
                Ok(wd) => {
                    debug!("watching {}", t.path.display());
                    t.wd = Some(wd);
                    match t.role {
                        Role::PluginDir => changes.plugin_dir_appeared = true,
                        Role::Dev | Role::Infiniband => changes.devices = true,
                        Role::Cdi => changes.cdi = true,
                        Role::PluginParent | Role::CdiParent => {}
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if !t.warned {
                        warn!(
                            "cannot watch {} ({e}; see fs.inotify.max_user_watches): polling it",
                            t.path.display()
                        );
                        t.warned = true;
                    }
                }
                Err(e) => debug!("cannot watch {} yet: {e}", t.path.display()),
            }
        }
        changes
    }

    /// Looks again at a stale mount found before: still deleted, or a false alarm (cleared).
    pub fn confirm_stale(&mut self) -> Option<&Path> {
        if !self.stale.as_deref().is_some_and(deleted_dir) {
            self.stale = None;
        }
        self.stale.as_deref()
    }

    /// Whether the plugin dir or the CDI dir is a deleted directory still mounted here.
    fn look_for_stale_mounts(&mut self) {
        if self.stale.is_some() {
            return;
        }
        self.stale = self
            .targets
            .iter()
            .filter(|t| matches!(t.role, Role::PluginDir | Role::Cdi))
            .find(|t| deleted_dir(&t.path))
            .map(|t| t.path.clone());
    }

    /// When the next look for a stale mount is due, if one is.
    pub fn recheck_at(&self) -> Option<std::time::Instant> {
        self.rechecks.iter().min().copied()
    }

    /// Looks for stale mounts if a look is due at `now`.
    pub fn recheck(&mut self, now: std::time::Instant) {
        if self.rechecks.iter().any(|t| *t <= now) {
            self.rechecks.retain(|t| *t > now);
            self.look_for_stale_mounts();
        }
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
                    cdi: true,
                    ..Changes::default()
                };
            }
        };
        let mut changes = Changes::default();
        let mut ours = false;
        for ev in &events {
            ours |= self.classify(ev, &mut changes);
        }
        if ours {
            // Something in the plugin dir or the CDI dir: look now, and again shortly (a
            // removal of the directory itself comes after its files, with no event of its own
            // while a mount holds it). The second look falls with gRPC's shutdown after a
            // kubelet goes (5 s), so a resting plugin wakes no more than before.
            let now = std::time::Instant::now();
            self.rechecks = [1, 5]
                .iter()
                .map(|s| now + std::time::Duration::from_secs(*s))
                .collect();
        }
        changes.merge(self.refresh());
        changes
    }

    /// The file name (last component) of `role`'s directory.
    fn child_name(&self, role: Role) -> Option<&OsStr> {
        self.target(role).and_then(|t| t.path.file_name())
    }

    /// Classifies one event; true when it came from the plugin dir or the CDI dir.
    fn classify(&mut self, ev: &InotifyEvent, changes: &mut Changes) -> bool {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: assume the worst of each kind.
            debug!("inotify queue overflowed");
            changes.devices = true;
            changes.socket_removed = true;
            changes.kubelet_restarted = true;
            changes.cdi = true;
            return true;
        }
        let roles: Vec<Role> = self
            .targets
            .iter()
            .filter(|t| t.wd == Some(ev.wd))
            .map(|t| t.role)
            .collect();
        let ours = roles
            .iter()
            .any(|r| matches!(r, Role::PluginDir | Role::Cdi));
        for role in roles {
            self.classify_as(role, ev, changes);
        }
        ours
    }

    fn classify_as(&mut self, role: Role, ev: &InotifyEvent, changes: &mut Changes) {
        let gone = ev.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0;
        let name = ev.name();
        let created = ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
        let removed = ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0;
        if gone {
            // A directory moved away keeps its watch (no IN_IGNORED): drop it ourselves.
            self.forget_role(role);
            if matches!(role, Role::PluginDir | Role::Cdi) {
                let path = self.target(role).map(|t| t.path.clone());
                if let Some(p) = path.filter(|p| deleted_dir(p)) {
                    self.stale = Some(p);
                }
            }
        }
        match role {
            Role::PluginDir => {
                if gone {
                    changes.socket_removed = true;
                } else if created && name == OsStr::new(KUBELET_SOCKET) {
                    changes.kubelet_restarted = true;
                } else if (removed || created)
                    && self.socket_names.iter().any(|n| name == OsStr::new(n))
                {
                    // Deleted, or something moved over it: either way it may no longer be ours.
                    changes.socket_removed = true;
                }
            }
            // The plugin dir gone, moved, or another put in its place: its watch (if any) is on
            // a directory no longer at the path. `refresh` (after this batch) watches what is
            // there now and says so.
            Role::PluginParent => {
                if gone || ((removed || created) && Some(name) == self.child_name(Role::PluginDir))
                {
                    self.forget_role(Role::PluginDir);
                    changes.socket_removed = true;
                }
            }
            Role::Dev => {
                if gone {
                    changes.devices = true;
                } else if name == OsStr::new("infiniband")
                    || Path::new("dev").join(name) == Path::new(KNEM_NODE)
                {
                    changes.devices = true;
                    if (removed || created) && name == OsStr::new("infiniband") {
                        self.forget_role(Role::Infiniband);
                    }
                }
            }
            Role::Infiniband => changes.devices = true,
            Role::Cdi => {
                if gone || self.spec_names.iter().any(|n| name == OsStr::new(n)) {
                    changes.cdi = true;
                }
            }
            Role::CdiParent => {
                if gone || ((removed || created) && Some(name) == self.child_name(Role::Cdi)) {
                    self.forget_role(Role::Cdi);
                    changes.cdi = true;
                }
            }
        }
    }

    /// Drops `role`'s watch because its directory went (its own `IN_IGNORED` may come later,
    /// or, for a directory moved away, never).
    fn forget_role(&mut self, role: Role) {
        let Some(t) = self.targets.iter_mut().find(|t| t.role == role) else {
            return;
        };
        let Some(wd) = t.wd.take() else {
            return;
        };
        let shared = self.targets.iter().any(|t| t.wd == Some(wd));
        if let (false, Some(inotify)) = (shared, &self.inotify) {
            // Usually already gone with the directory; EINVAL then is expected.
            let _ = inotify.rm_watch(wd);
        }
    }
}

/// A directory deleted while something (a bind mount) still holds it: the path still shows
/// it, with no links.
fn deleted_dir(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_dir() && m.nlink() == 0)
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
    fn classifies_kubelet_socket_devices_cdi_and_late_directories() {
        let base = std::env::temp_dir().join(format!("rdma-watch-{}", std::process::id()));
        let plugin_dir = base.join("kubelet/plugins");
        let root = base.join("root");
        let cdi_dir = base.join("run/cdi");
        fs::create_dir_all(&plugin_dir).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::create_dir_all(&cdi_dir).unwrap();
        let sockets = ["rdma.sock".to_string()];
        let paths = Paths {
            plugin_dir: &plugin_dir,
            socket_names: &sockets,
            host_root: &root,
            cdi: Some((&cdi_dir, vec!["jarvice.com_rdma.json".to_string()])),
        };
        let mut w = Watcher::new(paths, true);
        // dev/infiniband does not exist yet, but its parent is watched: no polling.
        assert!(w.complete());

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
        assert!(w.complete());
        fs::create_dir_all(root.join("dev/infiniband")).unwrap();
        assert!(wait_changes(&mut w).devices);

        // Our CDI spec: created, rewritten in place, truncated, deleted; other files are not ours.
        let spec = cdi_dir.join("jarvice.com_rdma.json");
        fs::write(&spec, b"{}").unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::write(&spec, b"{\"x\":1}").unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::OpenOptions::new()
            .write(true)
            .open(&spec)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::remove_file(&spec).unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::write(cdi_dir.join("nvidia.com_gpu.json"), b"{}").unwrap();
        assert!(!wait_changes(&mut w).any());
        // The CDI dir goes and comes back: both are events, and it is watched again.
        fs::remove_dir_all(&cdi_dir).unwrap();
        assert!(wait_changes(&mut w).cdi);
        assert!(w.complete(), "its parent is watched");
        fs::create_dir_all(&cdi_dir).unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::write(&spec, b"{}").unwrap();
        assert!(wait_changes(&mut w).cdi);

        // The plugin dir goes away and comes back (a kubelet reinstalled): an event, no poll.
        fs::remove_dir_all(&plugin_dir).unwrap();
        assert!(wait_changes(&mut w).socket_removed);
        assert!(w.watches_plugin_dir() && w.complete(), "through its parent");
        fs::create_dir_all(&plugin_dir).unwrap();
        assert!(wait_changes(&mut w).plugin_dir_appeared);
        fs::write(plugin_dir.join("kubelet.sock"), b"").unwrap();
        assert!(wait_changes(&mut w).kubelet_restarted);

        // The parent moved away (with the plugin dir in it): no watch stays on the moved
        // directories, and with the parent gone only polling can tell.
        fs::rename(base.join("kubelet"), base.join("kubelet.old")).unwrap();
        wait_changes(&mut w);
        assert!(!w.watches_plugin_dir() && !w.complete());
        fs::write(base.join("kubelet.old/plugins/kubelet.sock"), b"").unwrap();
        assert!(
            !wait_changes(&mut w).any(),
            "the old directory is not watched"
        );
        fs::create_dir_all(&plugin_dir).unwrap();
        assert!(w.refresh().plugin_dir_appeared);
        assert!(w.complete());
        fs::write(plugin_dir.join("kubelet.sock"), b"").unwrap();
        assert!(wait_changes(&mut w).kubelet_restarted);

        // A CDI dir put in place of the old one (a rename over it): the new one is watched.
        let fresh = base.join("run/cdi.new");
        fs::create_dir_all(&fresh).unwrap();
        fs::rename(&cdi_dir, base.join("run/cdi.old")).unwrap();
        fs::rename(&fresh, &cdi_dir).unwrap();
        assert!(wait_changes(&mut w).cdi);
        fs::write(&spec, b"{}").unwrap();
        assert!(wait_changes(&mut w).cdi, "the new CDI dir is watched");
        fs::write(base.join("run/cdi.old/jarvice.com_rdma.json"), b"{}").unwrap();
        assert!(!wait_changes(&mut w).any(), "the old one is not");
        fs::remove_dir_all(&base).unwrap();
    }
}
