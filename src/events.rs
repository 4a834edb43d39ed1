//! `--events`: notices ([`crate::observe::Notice`]) as Kubernetes Events (`events.k8s.io/v1`)
//! on this node's Node, so that `kubectl describe node` shows them. Posted from one thread of
//! their own through the API client; the daemon only puts a notice in a bounded queue.
//!
//! Deduplicated and paced the way client-go's recorder (`tools/events/event_broadcaster.go`)
//! does it: a notice like one seen in the last [`SERIES_FINISH`] is not a new Event but the
//! next of its series (`series.count`, `series.lastObservedTime`); the first repeat is patched
//! at once, later ones at most every [`PATCH_SPACING`]. Every write takes a token from a bucket
//! of [`BURST`] refilled one per [`REFILL`] (client-go's spam filter for one object); without a
//! token the write waits, so a flapping port costs the API server a few writes, not one per
//! flap. The Event names the Node with its name as UID, as the kubelet's own node Events do:
//! `kubectl describe node` looks for both.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use serde_json::{json, Value};

use crate::kube::{self, Kube};
use crate::observe::{Notice, Observer};

/// Notices waiting for the sender; more are dropped (and counted).
pub const QUEUE: usize = 64;
/// A series ends this long after its last notice (client-go's `finishTime`).
pub const SERIES_FINISH: Duration = Duration::from_secs(6 * 60);
/// Repeats after the first are written at most this often per series.
pub const PATCH_SPACING: Duration = Duration::from_secs(30);
/// Writes allowed at once, and one more per [`REFILL`] (client-go's spam filter: 25, 1/5 min).
pub const BURST: u32 = 25;
pub const REFILL: Duration = Duration::from_secs(5 * 60);
/// Series kept at once; a notice that would make one more is dropped.
const MAX_SERIES: usize = 256;
/// A write that failed for want of an answer is tried again after this (times the failures),
/// at most [`MAX_TRIES`] times (client-go: 12 tries about 10 s apart).
const RETRY: Duration = Duration::from_secs(10);
const MAX_TRIES: u32 = 12;
/// Node Events live in `default`, as the kubelet's do (a cluster-scoped object's Events must).
pub const NAMESPACE: &str = "default";
/// Who reports: `reportingController` must be a qualified name.
pub const CONTROLLER: &str = "jarvice.com/rdma-plugin";

/// One series: an Event and its repeats.
struct Series {
    notice: Notice,
    /// The Event's name in the API server, once created.
    name: Option<String>,
    first: SystemTime,
    count: u32,
    last_observed: SystemTime,
    /// The count the API server has (0: not created).
    written: u32,
    last_write: Option<Instant>,
    last_seen: Instant,
    failures: u32,
    /// Not before this (a retry after a failure, or a token to come).
    not_before: Option<Instant>,
}

impl Series {
    /// When this series must be written next, if it has news (`now` when at once).
    fn due(&self, now: Instant) -> Option<Instant> {
        if self.count == self.written {
            return None;
        }
        let paced = match self.last_write {
            // Created and repeated once: at once, as client-go patches the first repeat.
            Some(t) if self.written > 1 => t + PATCH_SPACING,
            _ => now,
        };
        Some(self.not_before.map_or(paced, |nb| nb.max(paced)))
    }
}

/// Starts the sender and makes `observer`'s notices go to it.
pub fn spawn(kube: Kube, node: String, observer: &Arc<Observer>) -> std::io::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<Notice>(QUEUE);
    let obs = Arc::clone(observer);
    info!("Events about Node {node} go to namespace {NAMESPACE}, reported by {CONTROLLER}");
    std::thread::Builder::new()
        .name("events".into())
        .stack_size(512 << 10)
        .spawn(move || Sender::new(kube, node, obs).run(rx))?;
    let obs = Arc::downgrade(observer);
    let tx: SyncSender<Notice> = tx;
    observer.set_notices(Box::new(move |n| {
        debug!("notice {} ({}): {}", n.reason, n.severity.as_str(), n.note);
        if let Err(TrySendError::Full(n) | TrySendError::Disconnected(n)) = tx.try_send(n) {
            if let Some(o) = obs.upgrade() {
                o.count("events", &[("reason", n.reason), ("result", "dropped")]);
            }
        }
    }));
    Ok(())
}

/// Posts one notice now, waiting for the answer (for a process about to exit).
pub fn post_now(kube: &Kube, node: &str, notice: Notice) -> Result<(), kube::Error> {
    let now = SystemTime::now();
    let name = event_name(node, now);
    let body = event(node, &name, &notice, now, 1, now);
    kube.post::<_, Value>(&events_path(None), &body).map(|_| ())
}

/// A series' identity: what client-go keys on (type, reason) and the note. client-go leaves
/// the note out and keys on the object, which would fold two ports' news into one Event with
/// the first port's text; ours names the port, so each gets its own.
type Key = (crate::observe::Severity, &'static str, String);

struct Sender {
    kube: Kube,
    node: String,
    observer: Arc<Observer>,
    series: BTreeMap<Key, Series>,
    tokens: u32,
    refilled: Instant,
    /// Refusals already logged, by status (a missing RBAC rule is said once).
    told: Vec<u16>,
}

impl Sender {
    fn new(kube: Kube, node: String, observer: Arc<Observer>) -> Sender {
        Sender {
            kube,
            node,
            observer,
            series: BTreeMap::new(),
            tokens: BURST,
            refilled: Instant::now(),
            told: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Notice>) {
        loop {
            // Waits with no timeout when nothing is due: no wake-ups while all is quiet.
            let now = Instant::now();
            let due = self.series.values().filter_map(|s| s.due(now)).min();
            let got = match due {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
            };
            match got {
                Ok(n) => self.add(n),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Whatever else is queued joins its series before anything is written.
            while let Ok(n) = rx.try_recv() {
                self.add(n);
            }
            self.write_due();
        }
    }

    fn add(&mut self, n: Notice) {
        let now = Instant::now();
        // Series that ended, with nothing left to write, go.
        self.series
            .retain(|_, s| s.count != s.written || now.duration_since(s.last_seen) < SERIES_FINISH);
        let key = (n.severity, n.reason, n.note.clone());
        if let Some(s) = self.series.get_mut(&key) {
            s.count += 1;
            s.last_observed = SystemTime::now();
            s.last_seen = now;
            return;
        }
        if self.series.len() >= MAX_SERIES {
            self.observer
                .count("events", &[("reason", n.reason), ("result", "dropped")]);
            return;
        }
        let t = SystemTime::now();
        self.series.insert(
            key,
            Series {
                notice: n,
                name: None,
                first: t,
                count: 1,
                last_observed: t,
                written: 0,
                last_write: None,
                last_seen: now,
                failures: 0,
                not_before: None,
            },
        );
    }

    fn take_token(&mut self) -> bool {
        let gained = (self.refilled.elapsed().as_secs_f64() / REFILL.as_secs_f64()) as u32;
        if gained > 0 {
            self.tokens = (self.tokens + gained).min(BURST);
            self.refilled += REFILL * gained;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// The series due at `now`, in the order tokens go to them: Events not posted yet first,
    /// Warnings before Normal, then the series written longest ago, so that one flapping port
    /// cannot keep every other Event waiting once the burst is spent.
    fn due_in_order(&self, now: Instant) -> Vec<Key> {
        let mut due: Vec<_> = self
            .series
            .iter()
            .filter(|(_, s)| s.due(now).is_some_and(|t| t <= now))
            .collect();
        due.sort_by_key(|(k, s)| {
            (
                s.written > 0,
                std::cmp::Reverse(k.0),
                s.last_write
                    .map(|t| std::cmp::Reverse(now.saturating_duration_since(t))),
            )
        });
        due.into_iter().map(|(k, _)| k.clone()).collect()
    }

    fn write_due(&mut self) {
        let now = Instant::now();
        let keys = self.due_in_order(now);
        for k in keys {
            if !self.take_token() {
                let next = self.refilled + REFILL;
                for s in self.series.values_mut().filter(|s| s.count != s.written) {
                    s.not_before = Some(next);
                }
                debug!("Events: out of tokens until {next:?}");
                return;
            }
            let Some(mut s) = self.series.remove(&k) else {
                continue;
            };
            self.write(&mut s);
            self.series.insert(k, s);
        }
    }

    /// Creates the Event, or patches its series; a patched Event that is gone (expired after
    /// the API server's event TTL) is created again.
    fn write(&mut self, s: &mut Series) {
        let reason = s.notice.reason;
        let result = match &s.name {
            Some(name) if s.written > 0 => {
                let patch = json!({"series": {
                    "count": s.count,
                    "lastObservedTime": micro_time(s.last_observed),
                }});
                match self
                    .kube
                    .merge_patch::<_, Value>(&events_path(Some(name)), &patch)
                {
                    Err(e) if e.code() == Some(404) => {
                        s.name = None;
                        self.create(s)
                    }
                    other => other.map(|_| "patched"),
                }
            }
            _ => self.create(s),
        };
        match result {
            Ok(what) => {
                s.written = s.count;
                s.last_write = Some(Instant::now());
                s.failures = 0;
                s.not_before = None;
                self.observer
                    .count("events", &[("reason", reason), ("result", what)]);
            }
            Err(e) => {
                s.failures += 1;
                let answered = e.code().is_some_and(|c| c < 500 && c != 429);
                if answered || s.failures >= MAX_TRIES {
                    // Refused as malformed or forbidden: sending it again changes nothing.
                    if !self.told.contains(&e.code().unwrap_or(0)) {
                        self.told.push(e.code().unwrap_or(0));
                        warn!("cannot post the Event {reason}: {e} (RBAC: events create/patch in {NAMESPACE})");
                    }
                    s.written = s.count;
                    self.observer
                        .count("events", &[("reason", reason), ("result", "failed")]);
                } else {
                    debug!("Event {reason} not posted ({e}): trying again");
                    s.not_before = Some(Instant::now() + RETRY * s.failures);
                }
            }
        }
    }

    fn create(&mut self, s: &mut Series) -> Result<&'static str, kube::Error> {
        // A name taken (two Events in one nanosecond, or a retry of one that did land) is
        // made afresh.
        for _ in 0..2 {
            let name = event_name(&self.node, SystemTime::now());
            let body = event(
                &self.node,
                &name,
                &s.notice,
                s.first,
                s.count,
                s.last_observed,
            );
            match self.kube.post::<_, Value>(&events_path(None), &body) {
                Err(e) if e.code() == Some(409) => continue,
                Err(e) => return Err(e),
                Ok(_) => {
                    s.name = Some(name);
                    return Ok("created");
                }
            }
        }
        Err(kube::Error::Status {
            code: 409,
            reason: "AlreadyExists".into(),
            message: "every Event name tried was taken".into(),
        })
    }
}

fn events_path(name: Option<&str>) -> String {
    let base = format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events");
    match name {
        Some(n) => format!("{base}/{}", kube::escape(n)),
        None => base,
    }
}

/// `<node>.<nanoseconds in hex>`, as client-go names Events, within a name's 253 characters.
fn event_name(node: &str, t: SystemTime) -> String {
    let nanos = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let salt = crate::sys::random_u64().unwrap_or(0) & 0xffff;
    let node: String = node.chars().take(230).collect();
    format!("{node}.{nanos:x}{salt:04x}")
}

/// What `kubectl describe node` shows in its Events table under Type, Reason and Message.
fn event(
    node: &str,
    name: &str,
    n: &Notice,
    first: SystemTime,
    count: u32,
    last: SystemTime,
) -> Value {
    let mut e = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "eventTime": micro_time(first),
        "reportingController": CONTROLLER,
        "reportingInstance": format!("jarvice-rdma-plugin-{}", node.chars().take(100).collect::<String>()),
        "action": action(n.reason),
        "reason": n.reason,
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "note": truncate(&n.note, 1024),
        "type": n.severity.as_str(),
    });
    if count > 1 {
        e["series"] = json!({"count": count, "lastObservedTime": micro_time(last)});
    }
    e
}

/// What we were doing when it happened (`action` is required in `events.k8s.io/v1`).
fn action(reason: &str) -> &'static str {
    match reason {
        r if r.starts_with("RdmaRegist") => "Register",
        "RdmaDeviceNodeRefused" => "Verify",
        "RdmaFrontendConflict" => "Start",
        _ => "CheckHealth",
    }
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// RFC 3339 UTC with six fractional digits: the API's `MicroTime` (jiff, as the slice's `Time`).
pub fn micro_time(t: SystemTime) -> String {
    use k8s_openapi::jiff::Timestamp;
    let us = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let ts = Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH);
    format!("{ts:.6}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_time_is_rfc3339_with_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_302_800_123_456);
        assert_eq!(micro_time(t), "2026-12-03T13:00:00.123456Z");
        assert_eq!(
            micro_time(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    fn series(written: u32, count: u32, last_write: Option<Instant>) -> Series {
        let t = SystemTime::now();
        Series {
            notice: Notice {
                severity: crate::observe::Severity::Normal,
                reason: "x",
                note: String::new(),
            },
            name: None,
            first: t,
            count,
            last_observed: t,
            written,
            last_write,
            last_seen: Instant::now(),
            failures: 0,
            not_before: None,
        }
    }

    #[test]
    fn tokens_go_to_new_events_then_warnings_then_the_longest_waiting() {
        use crate::observe::Severity::{Normal, Warning};
        let cfg = crate::config::DraConfig {
            kube_api: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let kube = Kube::new(&cfg).unwrap();
        let mut s = Sender::new(kube, "n".into(), Observer::new("device-plugin", &[]));
        let now = Instant::now();
        let long_ago = now - PATCH_SPACING * 4;
        let recent = now - PATCH_SPACING * 2;
        let key = |sev, r: &'static str| (sev, r, String::new());
        // A flapping port's Normal series, written recently and repeated since.
        s.series
            .insert(key(Normal, "RdmaPortUp"), series(3, 5, Some(recent)));
        s.series
            .insert(key(Warning, "RdmaPortDown"), series(3, 5, Some(long_ago)));
        s.series
            .insert(key(Normal, "RdmaHealthy"), series(0, 1, None));
        s.series
            .insert(key(Warning, "RdmaRegistrationFailing"), series(0, 1, None));
        s.series
            .insert(key(Normal, "RdmaRegistered"), series(2, 2, Some(recent)));
        let order: Vec<&str> = s.due_in_order(now).iter().map(|k| k.1).collect();
        assert_eq!(
            order,
            [
                "RdmaRegistrationFailing",
                "RdmaHealthy",
                "RdmaPortDown",
                "RdmaPortUp"
            ]
        );
    }

    #[test]
    fn names_and_notes_fit_the_api() {
        let long = "n".repeat(253);
        let name = event_name(&long, SystemTime::now());
        assert!(name.len() <= 253, "{}", name.len());
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(action("RdmaRegistrationFailing"), "Register");
        assert_eq!(action("RdmaPortDown"), "CheckHealth");
    }
}
