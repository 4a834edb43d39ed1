//! The daemon's one loop, on the main thread: serve -> register -> wait for an event -> act, for
//! every resource ([`Unit`]) at once.
//!
//! Events: a signal (signalfd), a filesystem change (inotify), a Register call finishing or a
//! stream ending (eventfds, one pair per unit), a deadline (retry, stream check, port-state
//! reading, self-check while serving, gRPC's shutdown once nothing serves), and, where inotify
//! cannot watch everything, a poll tick. With no kubelet there is none of them but inotify's
//! and signals: the process sleeps in `poll(2)` with no thread of gRPC's left. Nothing here
//! exits the process except a termination signal, a second instance already serving one of our
//! sockets, a plugin or CDI dir deleted on the host while mounted here (only a new container
//! sees the new one), or a setup failure.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::config::Config;
use crate::daemon::grpc::Grpc;
use crate::daemon::snapshot::HostReader;
use crate::daemon::unit::Unit;
use crate::daemon::watch::{Paths, Watcher};
use crate::host::{self, select::Selector};
use crate::kubelet::server;
use crate::limits;
use crate::observe::Observer;
use crate::resource::cdi;
use crate::sys::{self, SignalFd};

const SIGNALS: [libc::c_int; 4] = [
    sys::STOP_SIGNALS[0],
    sys::STOP_SIGNALS[1],
    sys::STOP_SIGNALS[2],
    libc::SIGHUP,
];
/// SIGHUP restarts at most this often; the ones in between are merged into the next.
const HUP_SPACING: Duration = Duration::from_millis(100);
/// After a termination signal, the process ends within this even if gRPC hangs in shutdown
/// (a SIGALRM handler exits; every socket is removed before any server stops).
const EXIT_WATCHDOG_SECS: libc::c_uint = sys::EXIT_WATCHDOG_SECS;

#[derive(Debug)]
pub enum Error {
    Setup {
        what: &'static str,
        source: io::Error,
    },
    Limits(String),
    /// The resources as configured cannot be served (two per-HCA resources select one HCA).
    Config(String),
    Serve(server::Error),
    /// A directory we serve in was deleted on the host while mounted here (a hostPath).
    StaleMount(std::path::PathBuf),
}

impl Error {
    /// 2 for a configuration the command line could have avoided, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Setup { what, source } => write!(f, "cannot set up {what}: {source}"),
            Error::Limits(why) => write!(f, "refusing to start: {why}"),
            Error::Config(why) => write!(f, "refusing to start: {why}"),
            Error::Serve(e) => write!(f, "{e}"),
            Error::StaleMount(path) => write!(
                f,
                "{} was deleted on the host and this container still has the old one mounted: \
                 exiting, so that a restarted container mounts the new one",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Two per-HCA resources must not select one HCA (it could be granted twice): refused at
/// start. A shared resource over a per-HCA resource's HCAs is allowed, with a warning (a pod of
/// each could hold the same HCA). HCAs that appear later go to the first per-HCA resource.
pub fn check_overlaps(units: &[Config]) -> Result<(), Error> {
    let h = host::scan(&units[0].host_root, &units[0].sysfs, units[0].selection())
        .map(|h| h.hcas)
        .unwrap_or_else(|_| host::sysfs::read(&units[0].sysfs));
    let selects =
        |s: &Selector, name: &str| h.get(name).is_some_and(|hca| s.check(hca).is_selected());
    for (i, a) in units.iter().enumerate() {
        for b in &units[i + 1..] {
            for hca in &h.list {
                if !(selects(&a.selector, &hca.name) && selects(&b.selector, &hca.name)) {
                    continue;
                }
                if a.per_hca && b.per_hca {
                    return Err(Error::Config(format!(
                        "per-HCA resources {} and {} both select {}: one HCA could be granted twice; narrow their hcas=/link=/pci-ids=/pci-addrs=",
                        a.resource_name, b.resource_name, hca.name
                    )));
                }
                if a.per_hca != b.per_hca {
                    warn!(
                        "{} and {} both grant {} (one shared, one per HCA): a pod of each may hold it at once",
                        a.resource_name, b.resource_name, hca.name
                    );
                }
            }
        }
    }
    Ok(())
}

/// Runs the device plugin until SIGTERM, SIGINT or SIGQUIT.
pub fn run(cfg: Config) -> Result<(), Error> {
    // Sockets we create are the kubelet's (root) alone: any local user could otherwise call
    // every RPC. Set before gRPC exists, so its bind(2) of our sockets gets 0700.
    sys::set_umask(0o077);
    sys::limit_malloc_arenas();
    limits::raise_open_files().map_err(Error::Limits)?;
    let configs = cfg.units();
    check_overlaps(&configs)?;
    let signals = take_signals(&SIGNALS)?;
    // Started when a resource first serves (there may be no kubelet yet).
    let mut grpc = Grpc::new().map_err(|source| Error::Setup {
        what: "eventfd",
        source,
    })?;
    limits::warn_memlock();
    // A second instance must find out now, not when a kubelet appears: we serve only then.
    for c in &configs {
        server::claim(&c.socket_path()).or_else(|e| match e {
            server::Error::InUse { .. } => Err(Error::Serve(e)),
            // Anything else (not a socket, cannot remove) is retried and logged by the unit.
            _ => Ok(()),
        })?;
    }
    let sockets: Vec<String> = configs.iter().map(|c| c.socket_name.clone()).collect();
    let specs: Vec<String> = configs
        .iter()
        .filter_map(|c| {
            cdi::spec_path(&c.cdi_dir, &c.resource_name)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    let paths = Paths {
        plugin_dir: &cfg.plugin_dir,
        socket_names: &sockets,
        host_root: &cfg.host_root,
        cdi: cfg.cdi.then_some((cfg.cdi_dir.as_path(), specs)),
    };
    let mut watcher = Watcher::new(paths, !cfg.poll_only);
    check_mounts(&mut watcher)?;
    let reader = Rc::new(RefCell::new(HostReader::new(&cfg)));
    let names: Vec<String> = configs.iter().map(|c| c.resource_name.clone()).collect();
    let observer = Observer::new("device-plugin", &names);
    start_observers(&cfg, &observer)?;
    let mut units = configs
        .into_iter()
        .map(|c| Unit::new(c, Rc::clone(&reader), Arc::clone(&observer)))
        .collect::<Result<Vec<Unit>, Error>>()?;

    let result = drive(&cfg, &mut units, &mut grpc, &mut watcher, &signals, &reader);
    if result.is_err() {
        // Whatever stopped us, no socket of ours stays behind (the CDI specs do: see
        // `Unit::withdraw`).
        stop_all(&mut units);
    }
    result
}

/// Starts what `--metrics-address` and `--events` ask for, feeding from `observer`. The metrics
/// thread binds its address itself (a port taken is a warning, not a stop); Events need the
/// node's name and the API server, and refuse to start without them.
pub fn start_observers(cfg: &Config, observer: &Arc<Observer>) -> Result<(), Error> {
    #[cfg(feature = "metrics")]
    if let Some(addr) = cfg.metrics_address {
        crate::metrics::spawn(addr, Arc::clone(observer)).map_err(|source| Error::Setup {
            what: "the metrics thread",
            source,
        })?;
    }
    #[cfg(feature = "dra")]
    if cfg.events {
        let node = crate::dra::daemon::node_name(cfg)?;
        let kube = crate::kube::Kube::new(&cfg.dra)
            .map_err(|e| Error::Config(format!("--events: {e}")))?;
        crate::events::spawn(kube, node, observer).map_err(|source| Error::Setup {
            what: "the Events thread",
            source,
        })?;
    }
    // Without the features, `config::parse` refuses the flags.
    let _ = (cfg, observer);
    Ok(())
}

/// Blocks `signals` and returns the signalfd that reads them. Called before any thread exists,
/// so every thread inherits the mask and the signals reach only this fd, read on the main
/// thread.
pub fn take_signals(signals: &[libc::c_int]) -> Result<SignalFd, Error> {
    sys::block_signals(signals).map_err(|source| Error::Setup {
        what: "signal mask",
        source,
    })?;
    SignalFd::new(signals).map_err(|source| Error::Setup {
        what: "signalfd",
        source,
    })
}

/// Every unit's socket first, then every server: a server that hangs in its shutdown cannot
/// leave another unit's socket behind when the watchdog ends the process.
fn stop_all(units: &mut [Unit]) {
    for u in units.iter_mut() {
        u.withdraw();
    }
    for u in units.iter_mut() {
        info!("stopping {}", u.resource_name());
        u.stop();
    }
}

/// The loop: until a termination signal (`Ok`) or an error.
fn drive(
    cfg: &Config,
    units: &mut [Unit],
    grpc: &mut Grpc,
    watcher: &mut Watcher,
    signals: &SignalFd,
    reader: &RefCell<HostReader>,
) -> Result<(), Error> {
    let self_check = |now: Instant| (!cfg.self_check.is_zero()).then(|| now + cfg.self_check);
    let mut next_check = self_check(Instant::now());
    // Kept across iterations, so frequent unrelated events cannot postpone it for ever.
    let mut poll_at: Option<Instant> = None;
    let mut hup_at: Option<Instant> = None;
    loop {
        if let Some(sig) = sys::stop_requested() {
            // It came while a server or gRPC was being stopped; the watchdog is armed.
            info!("signal {sig} received: stopping");
            stop_all(units);
            return Ok(());
        }
        let now = Instant::now();
        if hup_at.is_some_and(|t| t <= now) {
            hup_at = None;
            for u in units.iter_mut() {
                u.restart("SIGHUP", grpc)?;
            }
        }
        if next_check.is_some_and(|t| t <= now) {
            let changes = watcher.refresh();
            check_mounts(watcher)?;
            // A watch added now may see a directory changed since the last reading.
            reader.borrow_mut().invalidate();
            for u in units.iter_mut() {
                u.self_check(changes, grpc)?;
            }
            next_check = self_check(now);
        }
        for u in units.iter_mut() {
            u.tick(now, grpc)?;
            u.report();
        }
        let serving = units.iter().any(Unit::is_serving);
        // The self-check looks after servers: while none runs, nothing wakes us but events.
        if !serving {
            next_check = None;
        } else if next_check.is_none() {
            next_check = self_check(now);
        }
        grpc.settle(units.iter().any(Unit::needs_grpc), Instant::now());
        // Resting, only kubelet.sock matters (devices are read afresh when serving starts).
        let watched = if serving {
            watcher.complete()
        } else {
            watcher.watches_plugin_dir()
        };
        if watched {
            poll_at = None;
        } else if poll_at.is_none() {
            poll_at = Some(now + cfg.poll_interval);
        }
        let deadline = units
            .iter()
            .filter_map(Unit::deadline)
            .chain(
                [
                    hup_at,
                    next_check,
                    poll_at,
                    grpc.deadline(),
                    watcher.recheck_at(),
                ]
                .into_iter()
                .flatten(),
            )
            .min();
        // signalfd, then two per unit (Register outcome, stream ended), then inotify.
        let mut fds = vec![signals.as_raw_fd()];
        for u in units.iter() {
            fds.push(u.registrar.as_raw_fd());
            fds.push(u.client_left.as_raw_fd());
        }
        fds.extend(watcher.fd());
        let timeout = deadline.map(|t| t.saturating_duration_since(Instant::now()));
        let ready = sys::poll_readable(&fds, timeout).map_err(|source| Error::Setup {
            what: "poll",
            source,
        })?;
        // Whatever woke us may have changed the host: the units that read it now share one
        // fresh reading.
        reader.borrow_mut().invalidate();

        if ready[0] {
            match read_signals(signals) {
                Signals::Stop(sig) => {
                    // Armed first: a gRPC that cannot shut down (no threads left, say) must not
                    // keep a rolling update waiting for its SIGKILL.
                    sys::arm_exit_watchdog(EXIT_WATCHDOG_SECS);
                    info!("signal {sig} received: stopping");
                    stop_all(units);
                    return Ok(());
                }
                Signals::Hup if hup_at.is_none() => {
                    let last = units.iter().filter_map(|u| u.last_restart).max();
                    match last.map(|t| t + HUP_SPACING) {
                        Some(t) if t > Instant::now() => {
                            debug!("SIGHUP: restarting at most every {HUP_SPACING:?}; merged into the next");
                            hup_at = Some(t);
                        }
                        _ => {
                            for u in units.iter_mut() {
                                u.restart("SIGHUP", grpc)?;
                            }
                        }
                    }
                }
                Signals::Hup | Signals::None => {}
            }
        }
        for (i, u) in units.iter_mut().enumerate() {
            if ready[1 + 2 * i] {
                u.on_register_outcome();
            }
            if ready[2 + 2 * i] {
                u.on_client_left();
            }
        }
        if ready.get(1 + 2 * units.len()) == Some(&true) {
            let changes = watcher.read();
            check_mounts(watcher)?;
            // Events drained now may be newer than a reading a restart above just took.
            reader.borrow_mut().invalidate();
            for u in units.iter_mut() {
                u.on_changes(changes, grpc)?;
            }
        }
        watcher.recheck(Instant::now());
        check_mounts(watcher)?;
        if poll_at.is_some_and(|t| t <= Instant::now()) {
            poll_at = None;
            // No inotify for some directory: look for it again, rescan, check the sockets
            // (and, at the next tick, whether kubelet.sock is there to register with).
            let changes = watcher.refresh();
            check_mounts(watcher)?;
            // A watch added now may see a directory changed since the last reading.
            reader.borrow_mut().invalidate();
            for u in units.iter_mut() {
                u.self_check(changes, grpc)?;
            }
        }
    }
}

/// A deleted directory still mounted here cannot come back in this container: an error, so
/// that the process exits and the kubelet starts a container with the host's new directory.
fn check_mounts(watcher: &mut Watcher) -> Result<(), Error> {
    if watcher.stale_mount().is_none() {
        return Ok(());
    }
    // A second look before giving up the process: one odd stat must not crash-loop a pod.
    std::thread::sleep(Duration::from_millis(100));
    match watcher.confirm_stale() {
        Some(p) => Err(Error::StaleMount(p.to_path_buf())),
        None => Ok(()),
    }
}

enum Signals {
    None,
    Hup,
    Stop(libc::c_int),
}

/// Reads every pending signal: a termination signal wins; any number of SIGHUPs are one.
fn read_signals(signals: &SignalFd) -> Signals {
    let mut seen = Signals::None;
    loop {
        match signals.read() {
            Ok(Some(libc::SIGHUP)) => seen = Signals::Hup,
            Ok(Some(sig)) => return Signals::Stop(sig),
            Ok(None) => return seen,
            Err(e) => {
                warn!("reading signals failed: {e}");
                return seen;
            }
        }
    }
}
