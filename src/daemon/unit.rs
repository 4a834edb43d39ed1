//! One resource served: its own socket in the plugin dir, server generations, registration,
//! ListAndWatch streams and health. The main loop ([`crate::daemon::lifecycle`]) drives a set of
//! them from one thread.
//!
//! Registration is a state, not an action: a unit is registered when the kubelet that owns the
//! current `kubelet.sock` accepted a Register for the server generation now serving. After every
//! event the unit compares and registers only on a difference, one call at a time. A kubelet
//! restart (it deletes every socket in the plugin dir, ours included, then creates a new
//! `kubelet.sock`) therefore gives exactly one Register per resource, whatever order and
//! batching the filesystem events arrive in.
//!
//! Serving is a state too: a unit serves while a kubelet is there (`kubelet.sock` exists and is
//! not one found dead) and rests, with no server and no socket, while none is. The kubelet only
//! dials us after our Register, so a server with no kubelet serves nobody, and it keeps gRPC's
//! threads and timers running ([`crate::daemon::grpc`]).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::config::Config;
use crate::daemon::cdi_spec::{Outcome, SpecKeeper};
use crate::daemon::grpc::Grpc;
use crate::daemon::lifecycle::Error;
use crate::daemon::reading::Reading;
use crate::daemon::snapshot::HostReader;
use crate::daemon::watch::Changes;
use crate::host::health::{Mode, PortMonitor};
use crate::kubelet::registration::{kubelet_id, KubeletId, Registrar};
use crate::kubelet::server::{self, Serving};
use crate::kubelet::service::Settings;
use crate::observe::Observer;
use crate::resource::cdi;
use crate::sys::{self, EventFd};

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// After a registration, or after the kubelet ended a ListAndWatch stream, how long to wait for
/// it to open one before registering again. A registration itself makes the kubelet cancel the
/// old stream shortly before or after it opens the new one; the grace keeps that from looping,
/// and it doubles (to a minute) while the kubelet keeps not watching.
const STREAM_GRACE: Duration = Duration::from_secs(1);
const STREAM_GRACE_CAP: Duration = Duration::from_secs(60);
/// A `kubelet.sock` nobody has answered on for this long is a dead kubelet's (one killed
/// without the chance to remove it): the unit rests until a new `kubelet.sock` is made. A live
/// kubelet binds and listens in one go, so only a stale file refuses for long.
pub const KUBELET_DEAD_AFTER: Duration = Duration::from_secs(15);

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

/// One resource served: its socket, server, registration, streams and health.
pub struct Unit {
    cfg: Config,
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
    pub registrar: Registrar,
    /// The server generation and the `kubelet.sock` a Register was accepted for.
    registered: Option<(u64, KubeletId)>,
    /// The generation the Register in flight is for.
    registering: u64,
    /// When to try again after a failure (serving, or Register while `kubelet.sock` exists).
    retry_at: Option<Instant>,
    /// The `kubelet.sock` that refuses connections, and since when.
    silent: Option<(KubeletId, Instant)>,
    /// A `kubelet.sock` that refused for [`KUBELET_DEAD_AFTER`]: not served until replaced.
    dead_kubelet: Option<KubeletId>,
    /// Woken by stream threads whose client went away.
    pub client_left: Arc<EventFd>,
    /// When to check that the kubelet watches us (a stream is open).
    stream_check_at: Option<Instant>,
    stream_grace: Backoff,
    backoff: Backoff,
    last_failure: Option<String>,
    /// When this unit last restarted serving (SIGHUPs are spaced from it).
    pub last_restart: Option<Instant>,
    /// With `--cdi`: this resource's CDI spec, kept as it must be.
    cdi: Option<SpecKeeper>,
    /// The current reading is Unhealthy because the spec cannot be written.
    cdi_failed: bool,
    /// The host as read since the loop last woke, shared by every unit (main thread only).
    reader: Rc<RefCell<HostReader>>,
}

impl Unit {
    /// A unit for `cfg` (one resource), serving as soon as its first tick runs.
    pub fn new(
        cfg: Config,
        reader: Rc<RefCell<HostReader>>,
        observer: Arc<Observer>,
    ) -> Result<Unit, Error> {
        let eventfd = |source| Error::Setup {
            what: "eventfd",
            source,
        };
        let registrar = Registrar::new().map_err(eventfd)?;
        let client_left = Arc::new(EventFd::new().map_err(eventfd)?);
        info!(
            "starting: resource {}, socket {}, devices under {}, HCAs from {}, {}, granting {}, health {}",
            cfg.resource_name,
            cfg.socket_path().display(),
            cfg.host_root.join("dev").display(),
            cfg.sysfs.display(),
            if cfg.per_hca {
                "one device per HCA".to_string()
            } else {
                format!("{} device(s) advertised", cfg.shares)
            },
            cfg.selector.describe(),
            cfg.health
        );
        Ok(Unit {
            settings: Arc::new(Settings::from_config(&cfg, observer)),
            cdi: cfg
                .cdi
                .then(|| SpecKeeper::new(&cfg.cdi_dir, &cfg.resource_name)),
            monitor: PortMonitor::new(cfg.hold_down),
            cfg,
            serving: None,
            generation: 0,
            state: None,
            health_at: None,
            registrar,
            registered: None,
            registering: 0,
            retry_at: Some(Instant::now()),
            silent: None,
            dead_kubelet: None,
            client_left,
            stream_check_at: None,
            stream_grace: Backoff::new(STREAM_GRACE, STREAM_GRACE_CAP),
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
            last_failure: None,
            last_restart: None,
            cdi_failed: false,
            reader,
        })
    }

    /// Tells the observer whether this resource serves and is registered (after every turn of
    /// the loop: both change only there).
    pub fn report(&self) {
        let observer = &self.settings.observer;
        let name = &self.cfg.resource_name;
        observer.serving(name, self.is_serving(), self.is_registered());
        let open = self.serving.as_ref().map_or(0, |s| s.hub().open_streams());
        observer.streams(name, open);
    }

    /// The kubelet accepted the registration of the server now serving.
    pub fn is_registered(&self) -> bool {
        self.serving.is_some()
            && self
                .registered
                .is_some_and(|(g, k)| g == self.generation && Some(k) == self.kubelet_here())
    }

    /// The resource this unit serves.
    pub fn resource_name(&self) -> &str {
        &self.cfg.resource_name
    }

    /// Whether a server of this unit is running.
    pub fn is_serving(&self) -> bool {
        self.serving.is_some()
    }

    /// Whether this unit uses gRPC now (a server, or a Register call under way).
    pub fn needs_grpc(&self) -> bool {
        self.serving.is_some() || self.registrar.in_flight
    }

    /// The kubelet to serve: its socket's identity, when it exists and is not one found dead.
    fn kubelet_here(&self) -> Option<KubeletId> {
        kubelet_id(&self.cfg.kubelet_socket()).filter(|id| Some(*id) != self.dead_kubelet)
    }
}

impl Unit {
    /// Serves if not serving yet and a kubelet is there (a new generation, to be registered).
    fn serve(&mut self, grpc: &mut Grpc) -> Result<(), Error> {
        if self.serving.is_some() {
            return Ok(());
        }
        if self.kubelet_here().is_none() {
            self.note_no_kubelet();
            return Ok(());
        }
        let socket = self.cfg.socket_path();
        // Claimed before gRPC is started for it: a path we cannot serve (a file in the way)
        // must not start and stop gRPC with every retry.
        let started = server::claim(&socket).and_then(|()| {
            // The spec first: the kubelet may allocate as soon as it hears of a device.
            let now = self.read_host();
            Serving::start(
                &grpc.env(),
                &self.settings,
                &socket,
                now.list.clone(),
                &self.client_left,
            )
            .map(|s| (s, now))
        });
        match started {
            Ok((s, now)) => {
                self.schedule_health(&now);
                self.serving = Some(s);
                self.generation += 1;
                now.log_start(&self.cfg, self.state.as_ref());
                now.observe(&self.cfg, self.state.as_ref(), &self.settings.observer);
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

    /// Logs once that there is no kubelet to serve, and why.
    fn note_no_kubelet(&mut self) {
        let sock = self.cfg.kubelet_socket();
        let what = if !self.cfg.plugin_dir.is_dir() {
            format!(
                "{} does not exist: is the kubelet running, and is this its device-plugin directory (--plugin-dir)?",
                self.cfg.plugin_dir.display()
            )
        } else if kubelet_id(&sock).is_none() {
            format!("{} does not exist: is the kubelet running?", sock.display())
        } else {
            format!(
                "{} has not answered for {KUBELET_DEAD_AFTER:?}: the kubelet is gone.",
                sock.display()
            )
        };
        if self.last_failure.as_deref() != Some(what.as_str()) {
            info!(
                "{what} Not serving {} until a kubelet makes a new one",
                self.cfg.resource_name
            );
            self.last_failure = Some(what);
        }
    }

    /// Stops serving while no kubelet is there: no server, no socket (the CDI spec stays: the
    /// runtime may still start containers allocated before).
    fn rest(&mut self) {
        self.note_no_kubelet();
        if let Some(s) = self.serving.take() {
            s.stop();
        }
        self.registered = None;
        self.retry_at = None;
        self.stream_check_at = None;
        self.health_at = None;
        self.silent = None;
        self.backoff.reset();
        self.stream_grace.reset();
    }

    /// Registers when the kubelet owning `kubelet.sock` now has not accepted a Register for the
    /// server now serving. One call at a time: while one runs, its outcome decides.
    fn maybe_register(&mut self, grpc: &mut Grpc) {
        if self.serving.is_none() || self.registrar.in_flight || self.retry_at.is_some() {
            return;
        }
        let Some(kubelet) = self.kubelet_here() else {
            return;
        };
        if self.registered == Some((self.generation, kubelet)) {
            return;
        }
        // A kubelet.sock nobody answers on is the old kubelet's (the new one deletes it and
        // binds its own) or one whose kubelet is between bind and listen: a Register started
        // now could reach the new kubelet just before its creation event asks for another.
        // Ask again shortly; its replacement brings an event at once.
        // An error other than "refused" (EMFILE, EACCES) is no reason to wait: Register
        // itself then says what is wrong.
        if let Ok(false) = sys::socket_answers(&self.cfg.kubelet_socket()) {
            let now = Instant::now();
            let since = match self.silent {
                Some((id, since)) if id == kubelet => since,
                _ => now,
            };
            self.silent = Some((kubelet, since));
            let silent_for = now.duration_since(since);
            if silent_for >= KUBELET_DEAD_AFTER {
                self.dead_kubelet = Some(kubelet);
                self.rest();
                return;
            }
            // The last look falls on the dot, not up to a backoff step later.
            let delay = self
                .backoff
                .next()
                .min(KUBELET_DEAD_AFTER - silent_for + Duration::from_millis(1));
            let what = format!(
                "{} exists but nothing answers on it (an old kubelet's, or one starting)",
                self.cfg.kubelet_socket().display()
            );
            if self.last_failure.as_deref() != Some(what.as_str()) {
                info!("{what}: registering when a kubelet answers");
                self.last_failure = Some(what);
            }
            debug!("kubelet.sock does not answer; looking again in {delay:?}");
            self.retry_at = Some(now + delay);
            return;
        }
        self.silent = None;
        self.registering = self.generation;
        self.registrar.start(&grpc.env(), &self.cfg);
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
    pub fn restart(&mut self, why: &str, grpc: &mut Grpc) -> Result<(), Error> {
        if self.serving.is_none() && self.kubelet_here().is_none() {
            debug!("{why}: resting (no kubelet), nothing to restart");
            return Ok(());
        }
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
        self.serve(grpc)
    }

    /// Reads the host and, with `--cdi`, makes the spec match the reading. A spec that cannot
    /// be written makes the reading Unhealthy, with that reason: a CDI name that does not
    /// resolve fails every pod. Until the spec is on disk as it must be, Allocate answers with
    /// device specs alone.
    fn read_host(&mut self) -> Reading {
        let snapshot = self.reader.borrow_mut().get();
        let mut now = Reading::take(
            &snapshot,
            &self.settings,
            &self.cfg,
            &mut self.monitor,
            Instant::now(),
        );
        self.cdi_failed = false;
        let mut ready = false;
        if let Some(keeper) = &mut self.cdi {
            let devices = self.settings.resource.cdi_devices(&now.host, &now.grant);
            let text = cdi::render(&self.cfg.resource_name, &devices);
            // A new text: no CDI names until its spec is on disk and the assessment published
            // (Allocate must not pair a new assessment with an old spec; device specs alone are
            // always safe). The same text changes nothing, and names keep flowing.
            if !keeper.holds(&text) {
                self.settings.set_cdi_ready(false);
            }
            match keeper.ensure(&text, devices.len(), Instant::now()) {
                Outcome::Current => ready = true,
                Outcome::Deferred => {}
                Outcome::Failed(why) => {
                    self.cdi_failed = true;
                    now.fail(why);
                }
            }
        }
        // Before the kubelet hears of it: Allocate must grant what the list says.
        self.settings.publish(now.served());
        self.settings.set_cdi_ready(ready);
        now
    }

    /// The first half of stopping: our socket goes, so nobody is sent to a server that is
    /// stopping (done for every unit before any server is asked to stop, which may hang). The
    /// CDI spec stays: the kubelet restarts a running pod's container from its checkpoint, with
    /// the CDI names of the first Allocate and no new one, so the names must still resolve
    /// while the plugin is down (a rolling update, a crash). It names host paths that stay
    /// valid; the next instance rewrites it, a reboot clears `/var/run`.
    pub fn withdraw(&mut self) {
        if let Some(s) = &self.serving {
            s.remove_socket();
        }
    }

    /// Stops serving for good (after [`Unit::withdraw`]).
    pub fn stop(&mut self) {
        if let Some(s) = self.serving.take() {
            s.stop();
        }
    }

    pub fn on_register_outcome(&mut self) {
        let Some((id, result)) = self.registrar.outcome() else {
            return;
        };
        match result {
            Ok(()) => {
                let observer = &self.settings.observer;
                observer.registration(&self.cfg.resource_name, true, "");
                if let Some(k) = id {
                    observer.kubelet_registered(format!("{k:?}"));
                }
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
                self.settings
                    .observer
                    .registration(&self.cfg.resource_name, false, &what);
                if self.last_failure.as_deref() != Some(what.as_str()) {
                    info!("{what}; registering when it appears");
                    self.last_failure = Some(what);
                }
            }
            Err(e) => {
                let what = e.to_string();
                self.settings
                    .observer
                    .registration(&self.cfg.resource_name, false, &what);
                self.failed(what);
            }
        }
    }

    pub fn on_changes(&mut self, changes: Changes, grpc: &mut Grpc) -> Result<(), Error> {
        if changes.plugin_dir_appeared && self.serving.is_none() {
            return self.restart("the plugin dir appeared", grpc);
        }
        if (changes.socket_removed || changes.kubelet_restarted)
            && self.serving.is_some()
            && !self.serving.as_ref().is_some_and(Serving::owns_socket)
        {
            // The kubelet deletes every socket when it starts; without ours it cannot dial us.
            self.restart("our socket was removed", grpc)?;
        }
        if changes.kubelet_restarted {
            // A new kubelet: register with it now, whatever backoff an earlier failure set.
            debug!("kubelet.sock created");
            self.retry_at = None;
            self.backoff.reset();
        }
        if changes.devices {
            self.rescan();
        } else if changes.cdi {
            self.recheck_cdi();
        }
        Ok(())
    }

    /// Reads the host; when the kubelet must hear of it, sends every stream the full list.
    /// Logs each port transition once and what changed.
    fn rescan(&mut self) {
        if self.serving.is_none() {
            return;
        }
        // The spec first: the kubelet may allocate a new device as soon as it hears of it.
        let now = self.read_host();
        self.schedule_health(&now);
        if let Some(old) = &self.state {
            if now.news_since(old) {
                if let Some(serving) = &self.serving {
                    serving.hub().publish(now.list.clone());
                }
            }
            now.log_changes(&self.cfg, old);
            now.observe(&self.cfg, Some(old), &self.settings.observer);
        }
        self.state = Some(now);
    }

    /// Something in the CDI dir changed (our own writes come back here too): the spec is made
    /// what the last reading said, without reading the host again. Only a change between
    /// written and unwritable needs a new list for the kubelet, and a reading to make it.
    fn recheck_cdi(&mut self) {
        if self.serving.is_none() {
            return;
        }
        let Some(outcome) = self.cdi.as_mut().and_then(|k| k.recheck(Instant::now())) else {
            return;
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        self.settings
            .set_cdi_ready(matches!(outcome, Outcome::Current));
        if failed != self.cdi_failed {
            self.rescan();
        }
    }

    /// In `ports` mode, the next port-state reading: every interval, or sooner when a hold-down
    /// ends (so Unhealthy is not late by up to an interval). A reading that failed (EMFILE,
    /// ENOMEM: no event will say when it would work) is tried again every interval too, in
    /// any mode, rather than at the next self-check.
    fn schedule_health(&mut self, now: &Reading) {
        let again = now.health.mode == Mode::Ports || now.error.is_some();
        self.health_at = again.then(|| {
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

    /// Catches what events missed (`changes` from refreshing the watches, plus a rescan):
    /// devices changed, our socket gone or not answering, a new kubelet.sock (registered with
    /// by the loop), a kubelet that dropped our stream.
    pub fn self_check(&mut self, mut changes: Changes, grpc: &mut Grpc) -> Result<(), Error> {
        changes.devices = true;
        self.on_changes(changes, grpc)?;
        // Only a clear "nobody answers": a passing error (EMFILE) must not end the kubelet's
        // stream by restarting the server.
        let gone = matches!(sys::socket_answers(&self.cfg.socket_path()), Ok(false));
        if self.serving.is_some() && gone {
            return self.restart("self-check: our socket is gone or not answering", grpc);
        }
        // Not while a stream check is pending: it has its grace (the kubelet may be about to
        // open ListAndWatch after a Register).
        if self.stream_check_at.is_none() {
            self.check_streams();
        }
        Ok(())
    }

    /// Runs what is due at `now`: a retry (serve), a stream check, a port-state reading; serves
    /// or rests as a kubelet came or went; then registers if not registered.
    pub fn tick(&mut self, now: Instant, grpc: &mut Grpc) -> Result<(), Error> {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.serve(grpc)?;
        }
        match (self.serving.is_some(), self.kubelet_here().is_some()) {
            (true, false) => self.rest(),
            (false, true) if self.retry_at.is_none() => self.serve(grpc)?,
            _ => {}
        }
        // A new kubelet deletes our socket before it makes kubelet.sock; its events may not be
        // read yet. Registering the server whose socket is gone would cost a second Register.
        if self.serving.as_ref().is_some_and(|s| !s.owns_socket()) {
            self.restart("our socket was removed", grpc)?;
        }
        if self.stream_check_at.is_some_and(|t| t <= now) {
            self.stream_check_at = None;
            self.check_streams();
        }
        if self.health_at.is_some_and(|t| t <= now) {
            self.health_at = None;
            self.rescan();
        }
        if self
            .cdi
            .as_ref()
            .and_then(SpecKeeper::due)
            .is_some_and(|t| t <= now)
        {
            self.recheck_cdi();
        }
        self.maybe_register(grpc);
        Ok(())
    }

    /// The earliest deadline of this unit.
    pub fn deadline(&self) -> Option<Instant> {
        // The spec's retry matters only while serving (rescans are).
        let spec_due = self
            .cdi
            .as_ref()
            .and_then(SpecKeeper::due)
            .filter(|_| self.serving.is_some());
        [
            self.retry_at,
            self.stream_check_at,
            self.health_at,
            spec_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A stream of ours ended: check soon that the kubelet still watches.
    pub fn on_client_left(&mut self) {
        self.client_left.drain();
        self.stream_check_at = Some(Instant::now() + self.stream_grace.peek());
    }
}
