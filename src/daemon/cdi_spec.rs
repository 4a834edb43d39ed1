//! A resource's CDI spec kept as a state, like the registration: after every reading of the
//! host and every change in the CDI dir, the file is made what it must be. A spec deleted,
//! emptied or changed by someone else (a cleanup job, a runtime reinstall, an operator) is
//! logged and restored; one that cannot be written is a failure the resource reports as
//! Unhealthy, because every pod given a CDI name that does not resolve fails to start
//! (`CDI device injection failed: unresolvable CDI devices`).
//!
//! Restores are paced: another writer fighting over the file cannot make us spin. The first
//! restore after a quiet second is immediate; the next ones wait 100 ms, doubling to 10 s.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::resource::cdi;

/// Restores closer together than this are a fight, and paced.
const RESTORE_QUIET: Duration = Duration::from_secs(1);
const RESTORE_GAP_FIRST: Duration = Duration::from_millis(100);
const RESTORE_GAP_CAP: Duration = Duration::from_secs(10);
/// A failed write is tried again after this, doubling to the cap; nothing else (a reading, an
/// event) tries it sooner.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// A deleted spec is restored this long after the deletion is seen, not at once: an `rm -rf` of
/// the directory lists, deletes the files, then removes the directory, and a spec put back in
/// between would make that last step fail (`Directory not empty`).
const DELETE_GRACE: Duration = Duration::from_millis(50);
/// A restore is logged at warn at most this often; the ones between at debug, counted.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the spec is after [`SpecKeeper::ensure`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// On disk as it must be: CDI names resolve.
    Current,
    /// Not as it must be, and restored at [`SpecKeeper::due`] (paced): no CDI names meanwhile.
    Deferred,
    /// It cannot be written: the reason, for the resource's health.
    Failed(String),
}

/// What the file at the spec path is, against what it must say.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Same,
    Differs(&'static str),
}

/// One resource's spec file and what we know of it.
pub struct SpecKeeper {
    path: PathBuf,
    /// The text last written or found current.
    ours: Option<String>,
    /// When a deletion of the spec was first seen (the restore waits [`DELETE_GRACE`]).
    deleted_at: Option<Instant>,
    /// Why the last write failed (logged once).
    failure: Option<String>,
    retry: Duration,
    /// When to look again: a paced restore or a failed write.
    due: Option<Instant>,
    last_restore: Option<Instant>,
    gap: Duration,
    restores: u64,
    last_warned: Option<Instant>,
    /// The text last asked for, and its device count.
    wanted: Option<(String, usize)>,
}

impl SpecKeeper {
    /// The keeper of `kind`'s spec in `dir` (`/var/run/cdi/jarvice.com_rdma.json`).
    pub fn new(dir: &Path, kind: &str) -> SpecKeeper {
        SpecKeeper {
            path: cdi::spec_path(dir, kind),
            ours: None,
            deleted_at: None,
            failure: None,
            retry: RETRY_FIRST,
            due: None,
            last_restore: None,
            gap: Duration::ZERO,
            restores: 0,
            last_warned: None,
            wanted: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the keeper wants to be asked again (a paced restore, a retry after a failure).
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Makes the file say `text` (`devices` is for the log line). Writes only when the file
    /// differs; a difference from what we wrote is someone else's doing, and restored. Paced:
    /// while a restore or a retry is due later, nothing is read or written.
    pub fn ensure(&mut self, text: &str, devices: usize, now: Instant) -> Outcome {
        if self.wanted.is_none() {
            // Our first look: what an instance killed mid-write left behind goes.
            cdi::remove_temp_files(&self.path);
        }
        self.wanted = Some((text.to_string(), devices));
        if self.due.is_some_and(|t| now < t) {
            return match &self.failure {
                Some(why) => Outcome::Failed(why.clone()),
                None => Outcome::Deferred,
            };
        }
        let found = look(&self.path, text);
        if found == Found::Same {
            self.succeeded(text);
            return Outcome::Current;
        }
        let restoring = match (&self.ours, &found) {
            (Some(was), Found::Differs(what)) if was == text && self.failure.is_none() => {
                Some(*what)
            }
            _ => None,
        };
        if restoring == Some("deleted") {
            let seen = *self.deleted_at.get_or_insert(now);
            if now < seen + DELETE_GRACE {
                self.due = Some(seen + DELETE_GRACE);
                return Outcome::Deferred;
            }
        }
        if restoring.is_some() {
            if let Some(not_before) = self.last_restore.map(|t| t + self.gap) {
                if now < not_before {
                    self.due = Some(not_before);
                    debug!(
                        "{} differs again: restoring it at most every {:?}",
                        self.path.display(),
                        self.gap
                    );
                    return Outcome::Deferred;
                }
            }
        }
        match cdi::write_atomic(&self.path, text) {
            Ok(id) => {
                match restoring {
                    Some(what) => self.restored(what, now),
                    None => info!(
                        "wrote CDI spec {} ({devices} device(s))",
                        self.path.display()
                    ),
                }
                debug!("{} is file {id:?}", self.path.display());
                self.ours = Some(text.to_string());
                self.succeeded(text);
                Outcome::Current
            }
            Err(e) => {
                let why = format!("CDI spec {} cannot be written: {e}", self.path.display());
                if self.failure.is_none() {
                    self.retry = RETRY_FIRST;
                }
                if self.warn_now(now) {
                    warn!("{why}; no CDI names are handed out and the resource is Unhealthy until it can");
                } else {
                    debug!("{why}");
                }
                self.failure = Some(why.clone());
                self.due = Some(now + self.retry);
                self.retry = (self.retry * 2).min(RETRY_CAP);
                Outcome::Failed(why)
            }
        }
    }

    /// The last text asked for, again (after a change in the CDI dir: no need to read the
    /// host for it). `None` before the first [`SpecKeeper::ensure`].
    pub fn recheck(&mut self, now: Instant) -> Option<Outcome> {
        let (text, devices) = self.wanted.clone()?;
        Some(self.ensure(&text, devices, now))
    }

    /// Whether a warning may be logged now: at most one a minute (restores and failures).
    fn warn_now(&mut self, now: Instant) -> bool {
        let due = self
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if due {
            self.last_warned = Some(now);
        }
        due
    }

    fn succeeded(&mut self, text: &str) {
        if self.failure.take().is_some() {
            info!("CDI spec {} is written again", self.path.display());
        }
        // Also when someone else wrote what we would: ours now.
        if self.ours.as_deref() != Some(text) {
            self.ours = Some(text.to_string());
        }
        self.deleted_at = None;
        self.due = None;
        self.retry = RETRY_FIRST;
    }

    /// Logs a restore (at warn once a minute, counting the rest) and paces the next.
    fn restored(&mut self, what: &str, now: Instant) {
        self.restores += 1;
        let quick = self
            .last_restore
            .is_some_and(|t| now.duration_since(t) < RESTORE_QUIET);
        self.gap = if quick {
            (self.gap * 2).clamp(RESTORE_GAP_FIRST, RESTORE_GAP_CAP)
        } else {
            Duration::ZERO
        };
        self.last_restore = Some(now);
        let line = format!(
            "CDI spec {} was {what} by someone else: restored ({} restore(s) since start)",
            self.path.display(),
            self.restores
        );
        if self.warn_now(now) {
            warn!("{line}");
        } else {
            debug!("{line}");
        }
    }

    /// True when the spec on disk was last found saying `text` and nothing is pending: a
    /// reading that renders the same text changes nothing CDI names resolve to.
    pub fn holds(&self, text: &str) -> bool {
        self.ours.as_deref() == Some(text) && self.failure.is_none() && self.due.is_none()
    }
}

/// Compares the file at `path` with `text` without following a symlink or blocking on a FIFO.
fn look(path: &Path, text: &str) -> Found {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::Differs("deleted"),
        Err(_) => return Found::Differs("made unreadable"),
    };
    let t = meta.file_type();
    if t.is_dir() {
        return Found::Differs("replaced by a directory");
    }
    if t.is_symlink() {
        return Found::Differs("replaced by a symbolic link");
    }
    if t.is_fifo() || t.is_socket() || t.is_char_device() || t.is_block_device() {
        return Found::Differs("replaced by a special file");
    }
    if meta.len() == 0 {
        return Found::Differs("emptied");
    }
    if meta.len() != text.len() as u64 {
        return Found::Differs("changed");
    }
    match cdi::read_bounded(path, text.len() as u64) {
        Ok(content) if content == text.as_bytes() => Found::Same,
        Ok(_) => Found::Differs("changed"),
        Err(_) => Found::Differs("made unreadable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdma-keeper-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn restores_what_others_change_and_paces_a_fight() {
        let dir = temp("fight");
        let mut k = SpecKeeper::new(&dir, "jarvice.com/rdma");
        let t0 = Instant::now();
        assert_eq!(k.ensure("{\"a\":1}\n", 1, t0), Outcome::Current);
        let path = dir.join("jarvice.com_rdma.json");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        for (what, spoil) in [
            (
                "deleted",
                &(|p: &Path| fs::remove_file(p).unwrap()) as &dyn Fn(&Path),
            ),
            ("emptied", &|p: &Path| fs::write(p, b"").unwrap()),
            ("changed", &|p: &Path| fs::write(p, b"{\"a\":2}\n").unwrap()),
        ] {
            spoil(&path);
            assert_eq!(look(&path, "{\"a\":1}\n"), Found::Differs(what));
        }
        // A changed spec is restored at once; a deleted one after a grace (an `rm -rf` of the
        // directory must be able to finish); a second restore within a second waits 100 ms.
        let a = "{\"a\":1}\n";
        assert_eq!(k.ensure(a, 1, t0), Outcome::Current);
        assert_eq!(fs::read_to_string(&path).unwrap(), a);
        assert!(k.holds(a) && !k.holds("{}"));
        fs::remove_file(&path).unwrap();
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(k.ensure(a, 1, t1), Outcome::Deferred);
        assert_eq!(k.due(), Some(t1 + DELETE_GRACE));
        assert!(!k.holds(a));
        let t1 = t1 + DELETE_GRACE;
        assert_eq!(k.ensure(a, 1, t1), Outcome::Current);
        fs::remove_file(&path).unwrap();
        let t2 = t1 + Duration::from_millis(10);
        assert_eq!(k.ensure(a, 1, t2), Outcome::Deferred);
        assert_eq!(k.ensure(a, 1, t2 + DELETE_GRACE), Outcome::Deferred);
        assert_eq!(k.due(), Some(t1 + RESTORE_GAP_FIRST));
        assert!(!path.exists());
        assert_eq!(k.ensure(a, 1, t1 + RESTORE_GAP_FIRST), Outcome::Current);
        assert!(path.exists() && k.due().is_none());

        // A directory in the way: a failure with its reason, retried later; gone, restored.
        fs::remove_file(&path).unwrap();
        fs::create_dir_all(path.join("x")).unwrap();
        let t3 = t1 + Duration::from_secs(5);
        match k.ensure("{\"a\":1}\n", 1, t3) {
            Outcome::Failed(why) => assert!(why.contains("cannot be written"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(k.due(), Some(t3 + RETRY_FIRST));
        fs::remove_dir_all(&path).unwrap();
        // Failed writes are paced too: not tried again before the retry is due.
        assert!(matches!(k.ensure("{\"a\":1}\n", 1, t3), Outcome::Failed(_)));
        assert!(!path.exists());
        assert_eq!(
            k.ensure("{\"a\":1}\n", 1, t3 + RETRY_FIRST),
            Outcome::Current
        );

        // A symlink planted under a temp name of the old, guessable kind leads nowhere.
        let victim = dir.join("victim");
        fs::write(&victim, b"secret").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".jarvice.com_rdma.json.tmp")).unwrap();
        fs::remove_file(&path).unwrap();
        let t4 = t3 + Duration::from_secs(60);
        assert_eq!(k.ensure(a, 1, t4), Outcome::Deferred);
        assert_eq!(k.ensure(a, 1, t4 + DELETE_GRACE), Outcome::Current);
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        fs::remove_dir_all(&dir).unwrap();
    }
}
