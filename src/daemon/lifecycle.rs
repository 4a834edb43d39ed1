//! The daemon's one loop, on the main thread: serve -> register -> wait for an event -> act.
//!
//! Events: a signal (signalfd), a filesystem change (inotify), a Register call finishing (eventfd
//! from its thread), a retry deadline, and, where inotify cannot watch everything, a poll tick.
//! A failed step retries with capped exponential backoff; nothing here exits the process except
//! a termination signal or a second instance already serving our socket.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{EnvBuilder, Environment};
use log::{debug, info, warn};

use crate::config::Config;
use crate::daemon::watch::{Changes, Watcher};
use crate::host::health::{Health, Mode, PortMonitor, Transition};
use crate::host::{self, Grant, Host};
use crate::kubelet::api;
use crate::kubelet::registration::{kubelet_id, KubeletId, Registrar};
use crate::kubelet::server::{self, Serving};
use crate::kubelet::service::Settings;
use crate::resource::{HEALTHY, UNHEALTHY};
use crate::sys::{self, EventFd, SignalFd};

const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP];
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// After a registration, or after the kubelet ended a ListAndWatch stream, how long to wait for
/// it to open one before registering again. A registration itself makes the kubelet cancel the
/// old stream shortly before or after it opens the new one; the grace keeps that from looping,
/// and it doubles (to a minute) while the kubelet keeps not watching.
const STREAM_GRACE: Duration = Duration::from_secs(1);
const STREAM_GRACE_CAP: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub enum Error {
    Setup {
        what: &'static str,
        source: io::Error,
    },
    Serve(server::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Setup { what, source } => write!(f, "cannot set up {what}: {source}"),
            Error::Serve(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// A delay that doubles from `first` to `cap`; reset after a success.
struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            cap,
        }
    }
    fn reset(&mut self) {
        self.next = self.first;
    }
    /// The delay to use now; the one after it doubles.
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
    fn peek(&self) -> Duration {
        self.next
    }
}

struct Daemon {
    cfg: Config,
    env: Arc<Environment>,
    settings: Arc<Settings>,
    serving: Option<Serving>,
    /// What the current server's list was made from, and the list.
    state: Option<Assessed>,
    /// Every port's reported state, with hold-down.
    monitor: PortMonitor,
    /// When to read the port states again (`ports` health only: sysfs gives no events).
    health_at: Option<Instant>,
    registrar: Registrar,
    registered: Option<KubeletId>,
    retry_at: Option<Instant>,
    /// Woken by stream threads whose client went away.
    client_left: Arc<EventFd>,
    /// When to check that the kubelet watches us (a stream is open).
    stream_check_at: Option<Instant>,
    stream_grace: Backoff,
    backoff: Backoff,
    last_failure: Option<String>,
}

/// Runs the device plugin until SIGTERM, SIGINT or SIGQUIT.
pub fn run(cfg: Config) -> Result<(), Error> {
    // Before any thread exists, so every thread inherits the mask and signals reach only the
    // signalfd read on this thread.
    sys::block_signals(&SIGNALS).map_err(|source| Error::Setup {
        what: "signal mask",
        source,
    })?;
    let signals = SignalFd::new(&SIGNALS).map_err(|source| Error::Setup {
        what: "signalfd",
        source,
    })?;
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc").build());
    let settings = Arc::new(Settings::new(
        cfg.host_root.clone(),
        cfg.sysfs.clone(),
        cfg.selection(),
        cfg.selector.clone(),
        cfg.resource(),
    ));
    crate::limits::warn_memlock();
    let mut watcher = Watcher::new(
        &cfg.plugin_dir,
        &cfg.socket_name,
        &cfg.host_root,
        !cfg.poll_only,
    );
    let eventfd = |source| Error::Setup {
        what: "eventfd",
        source,
    };
    let registrar = Registrar::new().map_err(eventfd)?;
    let client_left = Arc::new(EventFd::new().map_err(eventfd)?);
    info!(
        "starting: resource {}, socket {}, devices under {}, HCAs from {}, {} device(s) advertised, granting {}, health {}",
        cfg.resource_name,
        cfg.socket_path().display(),
        cfg.host_root.join("dev").display(),
        cfg.sysfs.display(),
        cfg.shares,
        cfg.selector.describe(),
        cfg.health
    );
    let monitor = PortMonitor::new(cfg.hold_down);
    let mut d = Daemon {
        cfg,
        env,
        settings,
        serving: None,
        state: None,
        monitor,
        health_at: None,
        registrar,
        registered: None,
        retry_at: Some(Instant::now()),
        client_left,
        stream_check_at: None,
        stream_grace: Backoff::new(STREAM_GRACE, STREAM_GRACE_CAP),
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
        last_failure: None,
    };
    let mut next_check = d.self_check_deadline();
    // Kept across iterations, so frequent unrelated events cannot postpone it for ever.
    let mut poll_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if d.retry_at.is_some_and(|t| t <= now) {
            d.retry_at = None;
            d.attempt()?;
        }
        if d.stream_check_at.is_some_and(|t| t <= now) {
            d.stream_check_at = None;
            d.check_streams();
        }
        if next_check.is_some_and(|t| t <= now) {
            d.self_check(&mut watcher)?;
            next_check = d.self_check_deadline();
        }
        if watcher.complete() {
            poll_at = None;
        } else if poll_at.is_none() {
            poll_at = Some(now + d.cfg.poll_interval);
        }
        if d.health_at.is_some_and(|t| t <= now) {
            d.health_at = None;
            d.rescan();
        }
        let deadline = [
            d.retry_at,
            d.stream_check_at,
            next_check,
            poll_at,
            d.health_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let mut fds = vec![
            signals.as_raw_fd(),
            d.registrar.as_raw_fd(),
            d.client_left.as_raw_fd(),
        ];
        fds.extend(watcher.fd());
        let timeout = deadline.map(|t| t.saturating_duration_since(Instant::now()));
        let ready = sys::poll_readable(&fds, timeout).map_err(|source| Error::Setup {
            what: "poll",
            source,
        })?;

        if ready[0] && d.on_signals(&signals)? {
            return Ok(());
        }
        if ready[1] {
            d.on_register_outcome();
        }
        if ready[2] {
            d.client_left.drain();
            d.stream_check_at = Some(Instant::now() + d.stream_grace.peek());
        }
        if ready.get(3) == Some(&true) {
            let changes = watcher.read();
            d.on_changes(changes)?;
        }
        if poll_at.is_some_and(|t| t <= Instant::now()) {
            poll_at = None;
            // No inotify for some directory: look for it again, rescan, check the sockets.
            d.self_check(&mut watcher)?;
        }
    }
}

impl Daemon {
    fn self_check_deadline(&self) -> Option<Instant> {
        (!self.cfg.self_check.is_zero()).then(|| Instant::now() + self.cfg.self_check)
    }

    /// Serves if not serving yet, then starts a Register attempt.
    fn attempt(&mut self) -> Result<(), Error> {
        if self.serving.is_none() {
            let now = self.assess();
            let list = now.list.clone();
            let socket = self.cfg.socket_path();
            match Serving::start(&self.env, &self.settings, &socket, list, &self.client_left) {
                Ok(s) => {
                    self.serving = Some(s);
                    for t in &now.transitions {
                        self.log_transition(t, &now);
                    }
                    if self.state.as_ref().map(|old| host_hcas(&old.host))
                        != Some(host_hcas(&now.host))
                    {
                        self.log_hcas(&now);
                    }
                    log_refused(&now);
                    self.log_inventory("advertising", &now);
                    self.state = Some(now);
                }
                Err(e @ server::Error::InUse { .. }) => return Err(Error::Serve(e)),
                Err(e) => {
                    self.failed(e.to_string());
                    return Ok(());
                }
            }
        }
        self.registrar.start(&self.env, &self.cfg);
        Ok(())
    }

    /// Logs a failure (at info the first time it reads so, then at debug) and schedules a retry.
    fn failed(&mut self, what: String) {
        let delay = self.backoff.next();
        if self.last_failure.as_deref() == Some(what.as_str()) {
            debug!("{what}; retrying in {delay:?}");
        } else {
            info!("{what}; retrying in {delay:?}");
            self.last_failure = Some(what);
        }
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Stops the current server (ending its streams) and serves and registers again at once.
    fn restart(&mut self, why: &str) -> Result<(), Error> {
        info!(
            "{why}: serving and registering {} again",
            self.cfg.resource_name
        );
        if let Some(old) = self.serving.take() {
            old.stop();
        }
        self.registered = None;
        self.stream_check_at = None;
        self.stream_grace.reset();
        self.backoff.reset();
        self.last_failure = None;
        self.retry_at = None;
        self.attempt()
    }

    fn on_signals(&mut self, signals: &SignalFd) -> Result<bool, Error> {
        loop {
            let sig = match signals.read() {
                Ok(Some(sig)) => sig,
                Ok(None) => return Ok(false),
                Err(e) => {
                    warn!("reading signals failed: {e}");
                    return Ok(false);
                }
            };
            if sig == libc::SIGHUP {
                self.restart("SIGHUP")?;
                continue;
            }
            info!(
                "signal {sig} received: stopping {} on {}",
                self.cfg.resource_name,
                self.cfg.socket_path().display()
            );
            if let Some(s) = self.serving.take() {
                s.stop();
            }
            return Ok(true);
        }
    }

    fn on_register_outcome(&mut self) {
        let Some((id, result)) = self.registrar.outcome() else {
            return;
        };
        match result {
            Ok(()) => {
                info!(
                    "registered {} with the kubelet at {} (endpoint {})",
                    self.cfg.resource_name,
                    self.cfg.kubelet_socket().display(),
                    self.cfg.socket_name
                );
                self.registered = id;
                self.backoff.reset();
                self.last_failure = None;
                // The kubelet opens ListAndWatch right after Register: verify it did.
                self.stream_check_at = Some(Instant::now() + self.stream_grace.peek());
            }
            Err(e) => self.failed(e.to_string()),
        }
    }

    fn on_changes(&mut self, changes: Changes) -> Result<(), Error> {
        if changes.kubelet_restarted {
            return self.restart("kubelet.sock created (kubelet restarted)");
        }
        if changes.plugin_dir_appeared && self.serving.is_none() {
            return self.restart("the plugin dir appeared");
        }
        if changes.socket_removed && !self.cfg.socket_path().exists() && self.serving.is_some() {
            return self.restart("our socket was removed");
        }
        if changes.devices {
            self.rescan();
        }
        Ok(())
    }

    /// Reads the host; when the list changed (nodes or health), sends every stream the full
    /// list. Logs each port transition once and what changed.
    fn rescan(&mut self) {
        if self.serving.is_none() {
            return;
        }
        let now = self.assess();
        let Some(old) = self.state.take() else {
            self.state = Some(now);
            return;
        };
        // Node changes are published even when the list reads the same: the kubelet takes
        // every message as the whole list, and a repeat tells it the news promptly.
        if now.list != old.list || now.grant.nodes != old.grant.nodes {
            if let Some(serving) = &self.serving {
                serving.hub().publish(now.list.clone());
            }
        }
        for t in &now.transitions {
            self.log_transition(t, &now);
        }
        if now.host.nodes.refused != old.host.nodes.refused {
            log_refused(&now);
        }
        if now.grant.nodes != old.grant.nodes {
            self.log_inventory("device nodes changed", &now);
        } else if now.health.healthy != old.health.healthy && now.transitions.is_empty() {
            self.log_inventory("health changed", &now);
        }
        if host_hcas(&now.host) != host_hcas(&old.host) {
            self.log_hcas(&now);
        }
        self.state = Some(now);
    }

    /// Reads the host and assesses what the resource grants and its health; schedules the next
    /// port-state reading when health comes from the ports.
    fn assess(&mut self) -> Assessed {
        let at = Instant::now();
        let a = host::assess(
            self.settings.scan(),
            &self.settings.selector,
            self.cfg.health,
            &mut self.monitor,
            at,
        );
        let list = self
            .settings
            .resource
            .device_list(a.health.healthy, &a.grant.nodes);
        self.health_at = (a.health.mode == Mode::Ports).then(|| {
            let next = at + self.cfg.health_interval;
            // A hold-down ending sooner is read right then, so Unhealthy is not late by up to
            // an interval.
            self.monitor.deadline().map_or(next, |d| d.min(next))
        });
        Assessed {
            host: a.host,
            grant: a.grant,
            health: a.health,
            list,
            transitions: a.transitions,
        }
    }

    /// `mlx5_1 port 1: DOWN (Polling): jarvice.com/rdma is Unhealthy (0 of 2 HCAs up)`.
    fn log_transition(&self, t: &Transition, now: &Assessed) {
        let what = if t.up { "up" } else { "down" };
        if !now.grant.hcas.contains(&t.hca) {
            debug!(
                "{} port {}: {} ({what}), not granted by {}",
                t.hca, t.port, t.state, self.cfg.resource_name
            );
            return;
        }
        let level = if now.health.healthy && t.up {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "{} port {}: {}: {} is {} ({})",
            t.hca,
            t.port,
            t.state,
            self.cfg.resource_name,
            health_word(&now.health),
            now.health.reason
        );
    }

    /// One line naming the granted nodes and the resulting health; a warning when Unhealthy.
    fn log_inventory(&self, what: &str, now: &Assessed) {
        let level = if now.health.healthy {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        let paths: Vec<String> = now
            .grant
            .nodes
            .nodes
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect();
        log::log!(
            level,
            "{what}: {} node(s) [{}], {} is {} ({}, health from {})",
            paths.len(),
            paths.join(", "),
            self.cfg.resource_name,
            health_word(&now.health),
            now.health.reason,
            now.health.mode
        );
    }

    /// One line per HCA: ports, NUMA, PCI, nodes, selected or why not.
    fn log_hcas(&self, now: &Assessed) {
        if now.host.hcas.list.is_empty() {
            info!(
                "sysfs at {} lists no HCA: health from device nodes, every node granted as found",
                self.cfg.sysfs.display()
            );
        }
        for (hca, (_, verdict)) in now.host.hcas.list.iter().zip(&now.grant.verdicts) {
            let ports: Vec<String> = hca.ports.iter().map(|p| p.summary()).collect();
            let ports = if ports.is_empty() {
                vec!["no ports in sysfs".to_string()]
            } else {
                ports
            };
            let nodes: Vec<&str> = hca.verbs.iter().map(|e| e.name.as_str()).collect();
            let numa = hca.numa_node().map_or("?".into(), |n| n.to_string());
            let pci = hca.pci.as_ref().map_or("?", |p| p.address.as_str());
            let verdict = match verdict {
                host::select::Verdict::Selected => "granted".to_string(),
                host::select::Verdict::Excluded(why) => format!("not granted: {why}"),
            };
            info!(
                "HCA {}: {}; NUMA {numa}; PCI {pci}; nodes {}; {verdict}",
                hca.name,
                ports.join(", "),
                nodes.join(",")
            );
        }
    }

    /// A registration or a stream end a moment ago: if no stream is open now, the kubelet
    /// dropped us (or lost our registration) and must be registered with again.
    fn check_streams(&mut self) {
        let Some(serving) = &self.serving else {
            return;
        };
        if self.registered.is_none() || self.registrar.in_flight {
            return;
        }
        if serving.hub().open_streams() > 0 {
            self.stream_grace.reset();
            return;
        }
        let grace = self.stream_grace.next();
        info!(
            "the kubelet has no ListAndWatch stream open (waited {grace:?}): registering {} again",
            self.cfg.resource_name
        );
        self.registered = None;
        self.registrar.start(&self.env, &self.cfg);
    }

    /// Catches what events missed: devices changed, our socket gone or not answering, a new
    /// kubelet.sock.
    fn self_check(&mut self, watcher: &mut Watcher) -> Result<(), Error> {
        // Rescan whatever the watches say: this is what catches changes they missed.
        let mut changes = watcher.refresh();
        changes.devices = true;
        self.on_changes(changes)?;
        let answers = sys::socket_answers(&self.cfg.socket_path()).unwrap_or(false);
        if self.serving.is_some() && !answers {
            return self.restart("self-check: our socket is gone or not answering");
        }
        self.check_streams();
        let current = kubelet_id(&self.cfg.kubelet_socket());
        if self.registered.is_some() && current.is_some() && current != self.registered {
            return self.restart("self-check: kubelet.sock was replaced");
        }
        Ok(())
    }
}

/// One reading and what the daemon made of it.
struct Assessed {
    host: Host,
    grant: Grant,
    health: Health,
    list: api::ListAndWatchResponse,
    transitions: Vec<Transition>,
}

/// Nodes that look like ours but failed verification: never granted, and said loudly.
fn log_refused(now: &Assessed) {
    for x in &now.host.nodes.refused {
        warn!("refusing {}: {}", x.host_path, x.why);
    }
}

fn health_word(h: &Health) -> &'static str {
    if h.healthy {
        HEALTHY
    } else {
        UNHEALTHY
    }
}

/// The HCAs and their ports' raw states are not compared: only which HCAs exist.
fn host_hcas(h: &Host) -> Vec<&str> {
    h.hcas.list.iter().map(|x| x.name.as_str()).collect()
}
