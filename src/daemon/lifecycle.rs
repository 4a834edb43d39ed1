//! The daemon's one loop, on the main thread: serve -> register -> wait for an event -> act.
//!
//! Events: a signal (signalfd), a filesystem change (inotify), a Register call finishing (eventfd
//! from its thread), a deadline (retry, stream check, port-state reading, self-check), and, where
//! inotify cannot watch everything, a poll tick. Nothing here exits the process except a
//! termination signal, a second instance already serving our socket, or a setup failure.
//!
//! Registration is a state, not an action: we are registered when the kubelet that owns the
//! current `kubelet.sock` accepted a Register for the server generation now serving. After every
//! event the loop compares and registers only on a difference, one call at a time. A kubelet
//! restart (it deletes every socket in the plugin dir, ours included, then creates a new
//! `kubelet.sock`) therefore gives exactly one Register, whatever order and batching the
//! filesystem events arrive in.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{EnvBuilder, Environment};
use log::{debug, info, warn};

use crate::config::Config;
use crate::daemon::reading::Reading;
use crate::daemon::watch::{Changes, Watcher};
use crate::host::health::{Mode, PortMonitor};
use crate::kubelet::registration::{kubelet_id, KubeletId, Registrar};
use crate::kubelet::server::{self, Serving};
use crate::kubelet::service::Settings;
use crate::limits;
use crate::sys::{self, EventFd, SignalFd};

const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP];
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// After a registration, or after the kubelet ended a ListAndWatch stream, how long to wait for
/// it to open one before registering again. A registration itself makes the kubelet cancel the
/// old stream shortly before or after it opens the new one; the grace keeps that from looping,
/// and it doubles (to a minute) while the kubelet keeps not watching.
const STREAM_GRACE: Duration = Duration::from_secs(1);
const STREAM_GRACE_CAP: Duration = Duration::from_secs(60);
/// SIGHUP restarts at most this often; the ones in between are merged into the next.
const HUP_SPACING: Duration = Duration::from_millis(100);
/// After a termination signal, the process ends within this even if gRPC hangs in shutdown
/// (SIGALRM's default action; our socket is removed before gRPC is asked to stop).
const EXIT_WATCHDOG_SECS: libc::c_uint = 5;

#[derive(Debug)]
pub enum Error {
    Setup {
        what: &'static str,
        source: io::Error,
    },
    Limits(String),
    Serve(server::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Setup { what, source } => write!(f, "cannot set up {what}: {source}"),
            Error::Limits(why) => write!(f, "refusing to start: {why}"),
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
    /// Bumped with every server we start: a new server must be registered anew.
    generation: u64,
    /// The latest reading of the host (what the current list was made from).
    state: Option<Reading>,
    /// Every port's reported state, with hold-down.
    monitor: PortMonitor,
    /// When to read the port states again (`ports` health only: sysfs gives no events).
    health_at: Option<Instant>,
    registrar: Registrar,
    /// The server generation and the `kubelet.sock` a Register was accepted for.
    registered: Option<(u64, KubeletId)>,
    /// The generation the Register in flight is for.
    registering: u64,
    /// When to try again after a failure (serving, or Register while `kubelet.sock` exists).
    retry_at: Option<Instant>,
    /// Woken by stream threads whose client went away.
    client_left: Arc<EventFd>,
    /// When to check that the kubelet watches us (a stream is open).
    stream_check_at: Option<Instant>,
    stream_grace: Backoff,
    backoff: Backoff,
    last_failure: Option<String>,
    /// A SIGHUP restart waiting for [`HUP_SPACING`] to pass since the last one.
    hup_at: Option<Instant>,
    last_restart: Option<Instant>,
}

/// Runs the device plugin until SIGTERM, SIGINT or SIGQUIT.
pub fn run(cfg: Config) -> Result<(), Error> {
    // Sockets we create are the kubelet's (root) alone: any local user could otherwise call
    // every RPC. Set before gRPC exists, so its bind(2) of our socket gets 0700.
    sys::set_umask(0o077);
    sys::limit_malloc_arenas();
    limits::raise_open_files().map_err(Error::Limits)?;
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
    limits::warn_memlock();
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
        generation: 0,
        state: None,
        monitor,
        health_at: None,
        registrar,
        registered: None,
        registering: 0,
        retry_at: Some(Instant::now()),
        client_left,
        stream_check_at: None,
        stream_grace: Backoff::new(STREAM_GRACE, STREAM_GRACE_CAP),
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
        last_failure: None,
        hup_at: None,
        last_restart: None,
    };
    let mut next_check = d.self_check_deadline();
    // Kept across iterations, so frequent unrelated events cannot postpone it for ever.
    let mut poll_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // Serve if not serving, register if not registered (each a no-op when done).
        if d.retry_at.is_some_and(|t| t <= now) {
            d.retry_at = None;
            d.serve()?;
        }
        if d.hup_at.is_some_and(|t| t <= now) {
            d.hup_at = None;
            d.restart("SIGHUP")?;
        }
        if d.stream_check_at.is_some_and(|t| t <= now) {
            d.stream_check_at = None;
            d.check_streams();
        }
        if next_check.is_some_and(|t| t <= now) {
            d.self_check(&mut watcher)?;
            next_check = d.self_check_deadline();
        }
        if d.health_at.is_some_and(|t| t <= now) {
            d.health_at = None;
            d.rescan();
        }
        d.maybe_register();
        if watcher.complete() {
            poll_at = None;
        } else if poll_at.is_none() {
            poll_at = Some(now + d.cfg.poll_interval);
        }
        let deadline = [
            d.retry_at,
            d.hup_at,
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
            // No inotify for some directory: look for it again, rescan, check the sockets
            // (and, at the top of the loop, whether kubelet.sock is there to register with).
            d.self_check(&mut watcher)?;
        }
    }
}

impl Daemon {
    fn self_check_deadline(&self) -> Option<Instant> {
        (!self.cfg.self_check.is_zero()).then(|| Instant::now() + self.cfg.self_check)
    }

    /// Serves if not serving yet (a new generation, to be registered).
    fn serve(&mut self) -> Result<(), Error> {
        if self.serving.is_some() {
            return Ok(());
        }
        let now = Reading::take(&self.settings, &self.cfg, &mut self.monitor, Instant::now());
        self.schedule_health(&now);
        let socket = self.cfg.socket_path();
        match Serving::start(
            &self.env,
            &self.settings,
            &socket,
            now.list.clone(),
            &self.client_left,
        ) {
            Ok(s) => {
                self.serving = Some(s);
                self.generation += 1;
                now.log_start(&self.cfg, self.state.as_ref());
                self.state = Some(now);
                Ok(())
            }
            Err(e @ server::Error::InUse { .. }) => Err(Error::Serve(e)),
            Err(e) => {
                self.failed(e.to_string());
                Ok(())
            }
        }
    }

    /// Registers when the kubelet owning `kubelet.sock` now has not accepted a Register for the
    /// server now serving. One call at a time: while one runs, its outcome decides. With no
    /// `kubelet.sock`, waits for the inotify event of its creation (or the poll tick).
    fn maybe_register(&mut self) {
        if self.serving.is_none() || self.registrar.in_flight || self.retry_at.is_some() {
            return;
        }
        let Some(kubelet) = kubelet_id(&self.cfg.kubelet_socket()) else {
            let what = format!(
                "{} does not exist: is the kubelet running?",
                self.cfg.kubelet_socket().display()
            );
            if self.last_failure.as_deref() != Some(what.as_str()) {
                info!("{what} Registering when it appears");
                self.last_failure = Some(what);
            }
            return;
        };
        if self.registered == Some((self.generation, kubelet)) {
            return;
        }
        // A kubelet.sock nobody answers on is the old kubelet's (the new one deletes it and
        // binds its own) or one whose kubelet is between bind and listen: a Register started
        // now could reach the new kubelet just before its creation event asks for another.
        // Ask again shortly; its replacement brings an event at once.
        if !sys::socket_answers(&self.cfg.kubelet_socket()).unwrap_or(false) {
            let delay = self.backoff.next();
            debug!("kubelet.sock does not answer (yet); looking again in {delay:?}");
            self.retry_at = Some(Instant::now() + delay);
            return;
        }
        self.registering = self.generation;
        self.registrar.start(&self.env, &self.cfg);
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

    /// Stops the current server (ending its streams) and serves again at once; the new
    /// generation is registered by the loop.
    fn restart(&mut self, why: &str) -> Result<(), Error> {
        info!(
            "{why}: serving and registering {} again",
            self.cfg.resource_name
        );
        if let Some(old) = self.serving.take() {
            old.stop();
        }
        self.last_restart = Some(Instant::now());
        self.stream_check_at = None;
        self.stream_grace.reset();
        self.backoff.reset();
        self.last_failure = None;
        self.retry_at = None;
        self.serve()
    }

    /// Reads every pending signal: a termination signal stops at once; SIGHUPs (however many)
    /// make one restart, at most every [`HUP_SPACING`].
    fn on_signals(&mut self, signals: &SignalFd) -> Result<bool, Error> {
        let mut hup = false;
        loop {
            let sig = match signals.read() {
                Ok(Some(sig)) => sig,
                Ok(None) => break,
                Err(e) => {
                    warn!("reading signals failed: {e}");
                    break;
                }
            };
            if sig != libc::SIGHUP {
                self.stop(sig);
                return Ok(true);
            }
            hup = true;
        }
        if hup && self.hup_at.is_none() {
            let earliest = self.last_restart.map(|t| t + HUP_SPACING);
            match earliest {
                Some(t) if t > Instant::now() => {
                    debug!(
                        "SIGHUP: restarting at most every {HUP_SPACING:?}; merged into the next"
                    );
                    self.hup_at = Some(t);
                }
                _ => self.restart("SIGHUP")?,
            }
        }
        Ok(false)
    }

    /// Stops serving for good: a watchdog first, so a gRPC that cannot shut down (no threads
    /// left, say) cannot keep a rolling update waiting for its SIGKILL.
    fn stop(&mut self, sig: libc::c_int) {
        info!(
            "signal {sig} received: stopping {} on {}",
            self.cfg.resource_name,
            self.cfg.socket_path().display()
        );
        sys::arm_exit_watchdog(EXIT_WATCHDOG_SECS);
        if let Some(s) = self.serving.take() {
            s.stop();
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
                self.registered = id.map(|k| (self.registering, k));
                self.backoff.reset();
                self.last_failure = None;
                // The kubelet opens ListAndWatch right after Register: verify it did.
                self.stream_check_at = Some(Instant::now() + self.stream_grace.peek());
            }
            // No kubelet.sock: its creation (inotify) or the poll tick brings the next try.
            Err(e) if !self.cfg.kubelet_socket().exists() => {
                let what = e.to_string();
                if self.last_failure.as_deref() != Some(what.as_str()) {
                    info!("{what}; registering when it appears");
                    self.last_failure = Some(what);
                }
            }
            Err(e) => self.failed(e.to_string()),
        }
    }

    fn on_changes(&mut self, changes: Changes) -> Result<(), Error> {
        if changes.plugin_dir_appeared && self.serving.is_none() {
            return self.restart("the plugin dir appeared");
        }
        if (changes.socket_removed || changes.kubelet_restarted)
            && self.serving.is_some()
            && !self.serving.as_ref().is_some_and(Serving::owns_socket)
        {
            // The kubelet deletes every socket when it starts; without ours it cannot dial us.
            self.restart("our socket was removed")?;
        }
        if changes.kubelet_restarted {
            // A new kubelet: register with it now, whatever backoff an earlier failure set.
            debug!("kubelet.sock created");
            if self.serving.is_some() {
                self.retry_at = None;
            }
            self.backoff.reset();
        }
        if changes.devices {
            self.rescan();
        }
        Ok(())
    }

    /// Reads the host; when the kubelet must hear of it, sends every stream the full list.
    /// Logs each port transition once and what changed.
    fn rescan(&mut self) {
        if self.serving.is_none() {
            return;
        }
        let now = Reading::take(&self.settings, &self.cfg, &mut self.monitor, Instant::now());
        self.schedule_health(&now);
        if let Some(old) = &self.state {
            if now.news_since(old) {
                if let Some(serving) = &self.serving {
                    serving.hub().publish(now.list.clone());
                }
            }
            now.log_changes(&self.cfg, old);
        }
        self.state = Some(now);
    }

    /// In `ports` mode, the next port-state reading: every interval, or sooner when a hold-down
    /// ends (so Unhealthy is not late by up to an interval).
    fn schedule_health(&mut self, now: &Reading) {
        self.health_at = (now.health.mode == Mode::Ports).then(|| {
            let next = Instant::now() + self.cfg.health_interval;
            self.monitor.deadline().map_or(next, |d| d.min(next))
        });
    }

    /// A registration or a stream end a moment ago: if no stream is open now while the kubelet
    /// we registered with is still the one at `kubelet.sock`, it dropped us (or lost our
    /// registration) and must be registered with again. A kubelet that went away is not asked.
    fn check_streams(&mut self) {
        let Some(serving) = &self.serving else {
            return;
        };
        if self.registrar.in_flight {
            return;
        }
        let current = kubelet_id(&self.cfg.kubelet_socket());
        let Some((generation, kubelet)) = self.registered else {
            return;
        };
        if generation != self.generation || current != Some(kubelet) {
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
    }

    /// Catches what events missed: devices changed, our socket gone or not answering, a new
    /// kubelet.sock (the loop registers with it).
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
        Ok(())
    }
}
