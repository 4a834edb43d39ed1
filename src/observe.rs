//! What the daemon tells operators, kept where a scrape or an Event sender can read it without
//! asking the daemon: the latest reading of the host and of each resource (replaced after every
//! reading, as the kubelet's list is), and counters and latency histograms bumped where things
//! happen (registrations, Allocate, prepare). Both front-ends feed one [`Observer`].
//!
//! Nothing here has a timer or a thread: with metrics and Events off it is a few counters and an
//! `Arc` swap per reading. [`crate::metrics`] renders a [`Snapshot`] for Prometheus; the notices
//! go to [`crate::events`] when `--events` is on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::host::health::{Health, Transition};
use crate::host::nodes::Refused;
use crate::host::Host;

/// One resource's reading of the host, as both front-ends make it.
pub struct Read<'a> {
    pub resource: &'a str,
    pub host: &'a Arc<Host>,
    /// The HCAs the resource grants.
    pub granted: &'a [String],
    pub health: &'a Health,
    pub transitions: &'a [Transition],
}

/// Upper bounds (seconds) of the request latency histograms: from a prepare answered from its
/// spec file (~0.3 ms) to the kubelet's 45 s deadline.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 45.0,
];

/// A Kubernetes Event's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Normal,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        }
    }
}

/// Something an operator should see on the Node (`kubectl describe node`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    /// CamelCase, machine-readable (`RdmaPortDown`).
    pub reason: &'static str,
    /// What happened, for a person.
    pub note: String,
}

/// One resource as last read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceView {
    /// Devices advertised (ListAndWatch entries, or DRA devices).
    pub devices: u64,
    pub healthy_devices: u64,
    /// Devices held by prepared claims (DRA only: the device-plugin API never says when a
    /// pod lets a device go).
    pub allocated: Option<u64>,
    /// HCAs this resource grants.
    pub granted: Vec<String>,
    /// The whole resource is Healthy (`None` before the first reading).
    pub healthy: Option<bool>,
    /// The kubelet accepted our registration for what we serve now.
    pub registered: bool,
    /// Our gRPC server runs (false: resting, no kubelet).
    pub serving: bool,
    /// Streams the kubelet holds open to hear of health (ListAndWatch; DRA: the health stream).
    pub streams: u64,
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; the renderer sums them).
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// A counter's name and label values (a few fixed names, label values from small fixed sets:
/// resource names, RPC names, gRPC codes, Event reasons).
pub type CounterKey = (&'static str, Vec<(&'static str, String)>);

/// Everything a scrape shows, copied out under the lock in one go.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub frontend: &'static str,
    pub host: Option<Arc<Host>>,
    pub resources: BTreeMap<String, ResourceView>,
    pub counters: BTreeMap<CounterKey, u64>,
    pub latency: BTreeMap<&'static str, Histogram>,
}

type NoticeSink = Box<dyn Fn(Notice) + Send + Sync>;

/// Shared by the main loop, the gRPC handlers, the metrics server and the Event sender.
pub struct Observer {
    state: Mutex<Snapshot>,
    notices: Mutex<Option<NoticeSink>>,
    /// When the registration of each resource started failing, and whether that was told.
    failing: Mutex<BTreeMap<String, (Instant, bool)>>,
    /// The kubelet last registered with (an identity of its socket), by any resource.
    kubelet: Mutex<Option<String>>,
}

/// A registration failing for this long is an Event (a kubelet restart takes seconds).
pub const REGISTRATION_FAILING_AFTER: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observer({})", self.with(|s| s.frontend))
    }
}

impl Observer {
    pub fn new(frontend: &'static str, resources: &[String]) -> Arc<Observer> {
        let snap = Snapshot {
            frontend,
            resources: resources
                .iter()
                .map(|r| (r.clone(), ResourceView::default()))
                .collect(),
            ..Snapshot::default()
        };
        Arc::new(Observer {
            state: Mutex::new(snap),
            notices: Mutex::new(None),
            failing: Mutex::new(BTreeMap::new()),
            kubelet: Mutex::new(None),
        })
    }

    /// Where notices go (the Event sender); without one they are dropped.
    pub fn set_notices(&self, sink: NoticeSink) {
        *self.notices.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    /// Whether anybody listens for notices (so that callers can skip building them).
    pub fn wants_notices(&self) -> bool {
        self.notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    pub fn notice(&self, severity: Severity, reason: &'static str, note: String) {
        if let Some(sink) = &*self.notices.lock().unwrap_or_else(PoisonError::into_inner) {
            sink(Notice {
                severity,
                reason,
                note,
            });
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A copy of everything, for one scrape.
    pub fn snapshot(&self) -> Snapshot {
        self.with(|s| s.clone())
    }

    /// Adds `n` to a counter.
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        self.with(|s| *s.counters.entry(key).or_insert(0) += n);
    }

    pub fn count(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1);
    }

    /// One request of `rpc` ended with `code` after `took`.
    pub fn request(&self, rpc: &'static str, code: &str, took: Duration) {
        self.count("requests", &[("rpc", rpc), ("code", code)]);
        self.with(|s| {
            s.latency
                .entry(rpc)
                .or_default()
                .observe(took.as_secs_f64())
        });
    }

    /// The host as last read (every resource's reading shares it). Returns the device nodes
    /// refused in it and not in the one before: the host's news, told once however many
    /// resources read it.
    pub fn host_read(&self, host: &Arc<Host>) -> Vec<Refused> {
        self.with(|s| {
            if s.host.as_ref().is_some_and(|h| Arc::ptr_eq(h, host)) {
                return Vec::new();
            }
            let old = s.host.replace(Arc::clone(host));
            let before = old.as_ref().map_or(&[][..], |h| h.nodes.refused.as_slice());
            host.nodes
                .refused
                .iter()
                .filter(|x| !before.contains(x))
                .cloned()
                .collect()
        })
    }

    /// `resource` as last read (its devices, health and granted HCAs); a change of its health
    /// is counted (and returned, so that the caller can say why in a notice).
    pub fn resource_read(&self, resource: &str, view: ResourceView) -> Option<bool> {
        let changed = self.with(|s| {
            let old = s.resources.entry(resource.to_string()).or_default();
            let changed = match (old.healthy, view.healthy) {
                (Some(a), Some(b)) if a != b => Some(b),
                _ => None,
            };
            // What the reading does not know stays: the registration, the streams, and what
            // prepared claims hold (set by the claims' side).
            *old = ResourceView {
                registered: old.registered,
                serving: old.serving,
                streams: old.streams,
                allocated: old.allocated,
                ..view
            };
            changed
        });
        if let Some(h) = changed {
            let word = if h { "Healthy" } else { "Unhealthy" };
            self.count(
                "health_transitions",
                &[("resource", resource), ("health", word)],
            );
        }
        changed
    }

    /// Tells what one reading says (`devices` advertised, `healthy` of them) and, as notices,
    /// what changed since the reading before (`first`: there was none) that an operator should
    /// see on the Node: a granted HCA's port going down (past the hold-down) or up, the
    /// resource's health changing otherwise, device nodes refused (once per host reading).
    pub fn reading(&self, r: Read<'_>, devices: u64, healthy: u64, first: bool) {
        let refused = self.host_read(r.host);
        let changed = self.resource_read(
            r.resource,
            ResourceView {
                devices,
                healthy_devices: healthy,
                allocated: None,
                granted: r.granted.to_vec(),
                healthy: Some(r.health.healthy),
                registered: false,
                serving: false,
                streams: 0,
            },
        );
        if !self.wants_notices() {
            return;
        }
        let word = if r.health.healthy {
            "Healthy"
        } else {
            "Unhealthy"
        };
        let mut told = false;
        for t in r.transitions.iter().filter(|t| r.granted.contains(&t.hca)) {
            let (severity, reason) = if t.up {
                (Severity::Normal, "RdmaPortUp")
            } else {
                (Severity::Warning, "RdmaPortDown")
            };
            self.notice(
                severity,
                reason,
                format!(
                    "{} port {}: {}: {} is {word} ({})",
                    t.hca, t.port, t.state, r.resource, r.health.reason
                ),
            );
            told = true;
        }
        let starts_unhealthy = first && !r.health.healthy;
        if !told && (changed.is_some() || starts_unhealthy) {
            let (severity, reason) = if r.health.healthy {
                (Severity::Normal, "RdmaHealthy")
            } else {
                (Severity::Warning, "RdmaUnhealthy")
            };
            self.notice(
                severity,
                reason,
                format!("{} is {word}: {}", r.resource, r.health.reason),
            );
        }
        for x in refused {
            self.notice(
                Severity::Warning,
                "RdmaDeviceNodeRefused",
                format!("refusing {}: {}", x.host_path, x.why),
            );
        }
    }

    /// Devices held by prepared claims, per resource (DRA).
    pub fn allocated(&self, per_resource: &BTreeMap<String, u64>) {
        self.with(|s| {
            for (name, r) in s.resources.iter_mut() {
                r.allocated = Some(per_resource.get(name).copied().unwrap_or(0));
            }
        });
    }

    /// Whether the kubelet accepted the registration of any resource.
    pub fn registered_any(&self) -> bool {
        self.with(|s| s.resources.values().any(|r| r.registered))
    }

    /// A resource registered with the kubelet known as `id`: a kubelet other than the last one
    /// any resource registered with is a restart, counted once for all resources.
    pub fn kubelet_registered(&self, id: String) {
        let mut last = self.kubelet.lock().unwrap_or_else(PoisonError::into_inner);
        let restarted = last.as_ref().is_some_and(|l| *l != id);
        *last = Some(id);
        drop(last);
        if restarted {
            self.count("kubelet_restarts", &[]);
        }
    }

    /// The resources named at the start.
    pub fn resources(&self) -> Vec<String> {
        self.with(|s| s.resources.keys().cloned().collect())
    }

    /// Whether `resource`'s server runs and the kubelet accepted its registration.
    pub fn serving(&self, resource: &str, serving: bool, registered: bool) {
        self.with(|s| {
            let r = s.resources.entry(resource.to_string()).or_default();
            r.serving = serving;
            r.registered = registered;
        });
    }

    /// How many health streams are open, for every resource (DRA: one stream serves them all).
    pub fn streams_all(&self, open: usize) {
        self.with(|s| {
            s.resources
                .values_mut()
                .for_each(|r| r.streams = open as u64)
        });
    }

    /// How many health streams of `resource` are open.
    pub fn streams(&self, resource: &str, open: usize) {
        self.with(|s| s.resources.entry(resource.to_string()).or_default().streams = open as u64);
    }

    /// A registration of `resource` ended; a failure lasting past
    /// [`REGISTRATION_FAILING_AFTER`] is a notice once, and so is the success that ends it.
    pub fn registration(&self, resource: &str, accepted: bool, why: &str) {
        let result = if accepted { "accepted" } else { "failed" };
        self.count(
            "registrations",
            &[("resource", resource), ("result", result)],
        );
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if accepted {
            if let Some((since, true)) = failing.remove(resource) {
                drop(failing);
                self.notice(
                    Severity::Normal,
                    "RdmaRegistered",
                    format!(
                        "{resource}: the kubelet accepted the registration after {} s of failures",
                        since.elapsed().as_secs()
                    ),
                );
            }
            return;
        }
        let entry = failing
            .entry(resource.to_string())
            .or_insert((Instant::now(), false));
        if !entry.1 && entry.0.elapsed() >= REGISTRATION_FAILING_AFTER {
            entry.1 = true;
            let secs = entry.0.elapsed().as_secs();
            drop(failing);
            self.notice(
                Severity::Warning,
                "RdmaRegistrationFailing",
                format!("{resource}: registration with the kubelet failing for {secs} s: {why}"),
            );
        }
    }
}

/// `100 Gb/sec (4X EDR)` -> 12.5e9 bytes per second.
pub fn rate_bytes_per_second(rate: &str) -> Option<f64> {
    let mut words = rate.split_whitespace();
    let n: f64 = words.next()?.parse().ok()?;
    let scale = match words.next()? {
        "Gb/sec" => 1e9,
        "Mb/sec" => 1e6,
        _ => return None,
    };
    Some(n * scale / 8.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_bytes() {
        assert_eq!(rate_bytes_per_second("100 Gb/sec (4X EDR)"), Some(12.5e9));
        assert_eq!(rate_bytes_per_second("2.5 Gb/sec (1X SDR)"), Some(312.5e6));
        assert_eq!(rate_bytes_per_second("fast"), None);
        assert_eq!(rate_bytes_per_second(""), None);
    }

    #[test]
    fn histogram_buckets_and_overflow() {
        let mut h = Histogram::default();
        h.observe(0.0001);
        h.observe(0.003);
        h.observe(100.0);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[3], 1);
        assert_eq!(h.buckets.iter().sum::<u64>(), 2);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn health_changes_are_counted_once_each() {
        let o = Observer::new("device-plugin", &["r".into()]);
        let view = |h| ResourceView {
            healthy: Some(h),
            ..ResourceView::default()
        };
        assert_eq!(o.resource_read("r", view(true)), None);
        assert_eq!(o.resource_read("r", view(false)), Some(false));
        assert_eq!(o.resource_read("r", view(false)), None);
        assert_eq!(o.resource_read("r", view(true)), Some(true));
        let s = o.snapshot();
        let n = |w: &str| {
            s.counters
                .get(&(
                    "health_transitions",
                    vec![("resource", "r".into()), ("health", w.into())],
                ))
                .copied()
        };
        assert_eq!((n("Healthy"), n("Unhealthy")), (Some(1), Some(1)));
    }

    #[test]
    fn refused_nodes_are_told_once_per_host_reading_whatever_the_resources() {
        use crate::host::health::{Health, Mode};
        let o = Observer::new("device-plugin", &["a".into(), "b".into()]);
        let told = Arc::new(Mutex::new(Vec::new()));
        let t2 = Arc::clone(&told);
        o.set_notices(Box::new(move |n| t2.lock().unwrap().push(n.note)));
        let mut host = Host::default();
        host.nodes.refused.push(Refused {
            host_path: "/dev/infiniband/uverbs7".into(),
            why: "a symlink".into(),
        });
        let host = Arc::new(host);
        let health = Health {
            healthy: true,
            mode: Mode::Nodes,
            up: 1,
            total: 1,
            reason: String::new(),
            up_hcas: Vec::new(),
        };
        for (resource, first) in [("a", true), ("b", true), ("a", false)] {
            let r = Read {
                resource,
                host: &host,
                granted: &[],
                health: &health,
                transitions: &[],
            };
            o.reading(r, 1, 1, first);
        }
        // The same refusal in a new reading of the host is no news either.
        let again = Arc::new((*host).clone());
        let r = Read {
            resource: "a",
            host: &again,
            granted: &[],
            health: &health,
            transitions: &[],
        };
        o.reading(r, 1, 1, false);
        assert_eq!(
            *told.lock().unwrap(),
            ["refusing /dev/infiniband/uverbs7: a symlink"]
        );
    }

    #[test]
    fn a_kubelet_restart_is_counted_once_for_every_resource() {
        let o = Observer::new("device-plugin", &["a".into(), "b".into()]);
        for id in ["k1", "k1", "k2", "k2", "k2"] {
            o.kubelet_registered(id.into());
        }
        let n = o
            .snapshot()
            .counters
            .get(&("kubelet_restarts", vec![]))
            .copied();
        assert_eq!(n, Some(1));
    }

    #[test]
    fn a_reading_keeps_what_it_does_not_know() {
        let o = Observer::new("dra", &["r".into()]);
        o.serving("r", true, true);
        o.streams("r", 1);
        o.allocated(&BTreeMap::from([("r".to_string(), 2)]));
        o.resource_read(
            "r",
            ResourceView {
                devices: 3,
                ..ResourceView::default()
            },
        );
        let v = &o.snapshot().resources["r"];
        assert_eq!(
            (v.devices, v.allocated, v.registered, v.serving, v.streams),
            (3, Some(2), true, true, 1)
        );
    }

    #[test]
    fn a_registration_failing_for_a_minute_is_told_once() {
        let o = Observer::new("device-plugin", &["r".into()]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        o.set_notices(Box::new(move |n| s2.lock().unwrap().push(n.reason)));
        o.registration("r", false, "refused");
        assert!(seen.lock().unwrap().is_empty());
        // As if it had been failing for longer than a minute.
        o.failing.lock().unwrap().get_mut("r").unwrap().0 =
            Instant::now() - REGISTRATION_FAILING_AFTER;
        o.registration("r", false, "refused");
        o.registration("r", false, "refused");
        o.registration("r", true, "");
        o.registration("r", true, "");
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["RdmaRegistrationFailing", "RdmaRegistered"]
        );
    }
}
