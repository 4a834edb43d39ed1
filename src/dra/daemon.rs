//! The DRA front-end's loop, on the main thread: read the host, turn it into devices, publish
//! them (the ResourceSlice, the health streams, what prepare grants), serve the kubelet's
//! calls, and act on signals, kubelet registrations and deadlines. gRPC stays up the whole time
//! (the kubelet dials `dra.sock` whenever a pod needs a claim prepared).
//!
//! The host is read every `--health-interval` (port states give no events) and the devices'
//! health follows the same rules and hold-down as the device plugin's.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::config::Config;
use crate::daemon::grpc::Grpc;
use crate::daemon::lifecycle::{check_overlaps, start_observers, take_signals, Error};
use crate::daemon::snapshot::HostReader;
use crate::dra::claims::Claims;
use crate::dra::devices::{self, Inventory};
use crate::dra::proto::{self, dra, dra_health, pluginregistration};
use crate::dra::publish::{self, Publisher};
use crate::dra::service::{Plugin, Registration, Shared};
use crate::host::{self, health::PortMonitor};
use crate::kube::Kube;
use crate::kubelet::server::{self, Listener};
use crate::limits;
use crate::observe::{Notice, Observer, Read, Severity};
use crate::sys::{self, EventFd};

/// The kubelet marks a device Unknown after 30 s without news: the whole list goes out again
/// this often.
pub const HEALTH_RESEND: Duration = Duration::from_secs(10);
/// Our sockets are looked at this often while inotify watches both their directories (a
/// backstop: a deletion wakes us at once)...
const SOCKET_CHECK_WATCHED: Duration = Duration::from_secs(30);
/// ... and this often while it cannot (a directory not there yet, no inotify).
const SOCKET_CHECK: Duration = Duration::from_secs(1);

/// inotify on some directories: a file made, deleted or renamed there wakes the loop (our
/// sockets' directories; `/dev` and `/dev/infiniband`, for device nodes that come and go).
struct DirWatch {
    inotify: Option<sys::Inotify>,
    dirs: Vec<std::path::PathBuf>,
    /// The watch of each directory, once added.
    watches: Vec<Option<libc::c_int>>,
}

impl DirWatch {
    fn new(dirs: Vec<std::path::PathBuf>) -> DirWatch {
        let inotify = sys::Inotify::new()
            .map_err(|e| warn!("no inotify ({e}): looking at {dirs:?} now and then instead"))
            .ok();
        let mut w = DirWatch {
            inotify,
            watches: vec![None; dirs.len()],
            dirs,
        };
        w.arm();
        w
    }

    /// Watches the directories not watched yet (made since, or watched no more).
    fn arm(&mut self) {
        let Some(ino) = &self.inotify else { return };
        let mask = libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        for (dir, wd) in self.dirs.iter().zip(self.watches.iter_mut()) {
            if wd.is_none() {
                *wd = ino.add_watch(dir, mask).ok();
            }
        }
    }

    fn complete(&self) -> bool {
        self.inotify.is_some() && self.watches.iter().all(Option::is_some)
    }

    /// Reads the events; a directory gone (its watch dropped) is watched again at [`arm`].
    fn drain(&mut self) {
        let Some(ino) = &self.inotify else { return };
        for e in ino.read_events().unwrap_or_default() {
            if e.mask & libc::IN_IGNORED != 0 {
                for wd in self.watches.iter_mut() {
                    if *wd == Some(e.wd) {
                        *wd = None;
                    }
                }
            }
        }
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.inotify.as_ref().map(AsRawFd::as_raw_fd)
    }
}
const SIGNALS: [libc::c_int; 4] = [
    sys::STOP_SIGNALS[0],
    sys::STOP_SIGNALS[1],
    sys::STOP_SIGNALS[2],
    libc::SIGHUP,
];

/// This node's name: `--node-name`, else `NODE_NAME` (the downward API's `spec.nodeName`).
pub fn node_name(cfg: &Config) -> Result<String, Error> {
    let name = match &cfg.dra.node_name {
        Some(n) => n.clone(),
        None => std::env::var("NODE_NAME").map_err(|_| {
            Error::Config(
                "--frontend dra and --events need this node's name: set NODE_NAME (downward API spec.nodeName) or --node-name".into(),
            )
        })?,
    };
    if !crate::config::is_dns_subdomain(&name, 253) {
        return Err(Error::Config(format!(
            "node name {name:?} is not a Kubernetes node name"
        )));
    }
    Ok(name)
}

/// A device plugin of ours serving one of the resource names here: the scheduler would never
/// use DRA for that name on this node, so the two must not run together.
pub fn device_plugin_rival(cfg: &Config) -> Option<String> {
    cfg.units().iter().find_map(|u| {
        matches!(sys::socket_answers(&u.socket_path()), Ok(true)).then(|| {
            format!(
                "{} is served on this node by a device plugin ({} answers): the scheduler uses DRA for an extended resource only where no device plugin advertises it, so a node runs one front-end per name; stop the device plugin first",
                u.resource_name,
                u.socket_path().display()
            )
        })
    })
}

/// The devices of one reading of the host.
pub(crate) struct Reader {
    units: Vec<Config>,
    monitors: Vec<PortMonitor>,
    host: HostReader,
    /// Told of every reading (the daemon's; `list` has none).
    observer: Option<Arc<Observer>>,
    /// No reading was told yet.
    first: bool,
}

impl Reader {
    pub(crate) fn new(cfg: &Config) -> Reader {
        let units = cfg.units();
        Reader {
            monitors: units
                .iter()
                .map(|u| PortMonitor::new(u.hold_down))
                .collect(),
            host: HostReader::new(cfg),
            units,
            observer: None,
            first: true,
        }
    }

    pub(crate) fn observed(mut self, observer: Arc<Observer>) -> Reader {
        self.observer = Some(observer);
        self
    }

    pub(crate) fn read(&mut self) -> Inventory {
        self.host.invalidate();
        let snap = self.host.get();
        let now = Instant::now();
        let assessments: Vec<host::Assessment> = self
            .units
            .iter()
            .zip(self.monitors.iter_mut())
            .map(|(u, m)| {
                let a = host::assess(
                    Arc::clone(&snap.host),
                    &u.selector,
                    &u.taken,
                    u.health,
                    m,
                    now,
                );
                for t in &a.transitions {
                    info!("{} port {}: {}", t.hca, t.port, t.state);
                }
                a
            })
            .collect();
        let pairs: Vec<(&Config, &host::Assessment)> =
            self.units.iter().zip(assessments.iter()).collect();
        let inv = devices::inventory(&pairs);
        if let Some(o) = &self.observer {
            for (u, a) in &pairs {
                let mine = inv.devices.iter().filter(|d| d.resource == u.resource_name);
                let (n, healthy) = mine.fold((0, 0), |(n, h), d| (n + 1, h + u64::from(d.healthy)));
                o.reading(
                    Read {
                        resource: &u.resource_name,
                        host: &a.host,
                        granted: &a.grant.hcas,
                        health: &a.health,
                        transitions: &a.transitions,
                    },
                    n,
                    healthy,
                    self.first,
                );
            }
            self.first = false;
        }
        inv
    }
}

/// Runs the DRA front-end until SIGTERM, SIGINT or SIGQUIT.
pub fn run(cfg: Config) -> Result<(), Error> {
    sys::set_umask(0o077);
    sys::limit_malloc_arenas();
    limits::raise_open_files().map_err(Error::Limits)?;
    check_overlaps(&cfg.units())?;
    let node = node_name(&cfg)?;
    if let Some(why) = device_plugin_rival(&cfg) {
        if cfg.events {
            // The process ends now: this Event goes out before it does, or not at all.
            let notice = Notice {
                severity: Severity::Warning,
                reason: "RdmaFrontendConflict",
                note: why.clone(),
            };
            match Kube::new(&cfg.dra) {
                Ok(kube) => {
                    if let Err(e) = crate::events::post_now(&kube, &node, notice) {
                        warn!("cannot post the Event RdmaFrontendConflict: {e}");
                    }
                }
                Err(e) => warn!("cannot post the Event RdmaFrontendConflict: {e}"),
            }
        }
        return Err(Error::Config(why));
    }
    let signals = take_signals(&SIGNALS)?;
    let names: Vec<String> = cfg
        .units()
        .iter()
        .map(|u| u.resource_name.clone())
        .collect();
    let observer = Observer::new("dra", &names);
    start_observers(&cfg, &observer)?;
    let kube = Kube::new(&cfg.dra).map_err(|e| Error::Config(e.to_string()))?;
    limits::warn_memlock();
    let driver = cfg.dra.driver.clone();
    let endpoint = cfg.dra.service_socket();
    let reg_socket = cfg.dra.registration_socket();
    let registered = Arc::new(EventFd::new().map_err(|source| Error::Setup {
        what: "eventfd",
        source,
    })?);
    let stream_left = Arc::new(EventFd::new().map_err(|source| Error::Setup {
        what: "eventfd",
        source,
    })?);
    // Made now (the leaf only: its parent is the runtime's), so that `diagnose` and the
    // first prepare find it.
    if !cfg.cdi_dir.is_dir() {
        if let Err(e) = std::fs::create_dir(&cfg.cdi_dir) {
            warn!("cannot create the CDI dir {}: {e}", cfg.cdi_dir.display());
        }
    }
    let claims = Claims::load(&cfg.cdi_dir, &driver, &node, cfg.hca_envs);
    let shared = Arc::new(
        Shared::new(
            &driver,
            &node,
            endpoint.display().to_string(),
            kube.clone(),
            claims,
            (Arc::clone(&registered), Arc::clone(&stream_left)),
            Arc::clone(&observer),
        )
        .map_err(|source| Error::Setup {
            what: "the prepare threads",
            source,
        })?,
    );
    info!(
        "DRA driver {driver} on node {node}: API server {}, kubelet registration {}, service {}",
        kube.base(),
        reg_socket.display(),
        endpoint.display()
    );
    let mut reader = Reader::new(&cfg).observed(Arc::clone(&observer));
    let mut inv = Arc::new(reader.read());
    log_inventory(&inv);
    shared.set_inventory(Arc::clone(&inv));
    shared.report_allocated();
    shared.publish_health(&inv);
    let publisher =
        publish::spawn(Publisher::new(kube, &driver, &node).observed(Arc::clone(&observer)))
            .map_err(|source| Error::Setup {
                what: "the ResourceSlice publisher thread",
                source,
            })?;
    publisher.want(Arc::clone(&inv));

    let mut grpc = Grpc::new().map_err(|source| Error::Setup {
        what: "eventfd",
        source,
    })?;
    let mut sockets = Sockets {
        service: None,
        registration: None,
        retry_at: None,
        waiting: None,
    };
    // Our own directory first, so that it can be watched from the start.
    if let Some(dir) = endpoint.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            warn!("cannot create {}: {e}", dir.display());
        }
    }
    let mut dirs = DirWatch::new(
        [endpoint.as_path(), reg_socket.as_path()]
            .iter()
            .filter_map(|s| s.parent().map(Path::to_path_buf))
            .collect(),
    );
    // Device nodes made or removed (a driver loaded, hot-plug): read the host at once rather
    // than at the next port-state reading.
    let dev = cfg.host_root.join("dev");
    let mut devices = DirWatch::new(vec![dev.join("infiniband"), dev]);
    let result = (|| -> Result<(), Error> {
        let mut next_read = Instant::now() + cfg.health_interval;
        let mut next_health = Instant::now() + HEALTH_RESEND;
        loop {
            let now = Instant::now();
            dirs.arm();
            devices.arm();
            sockets.ensure(&mut grpc, &shared, &endpoint, &reg_socket, now)?;
            // As of this turn of the loop (a stream that ends wakes it; one that opens is
            // counted at the next wake, within --health-interval).
            observer.streams_all(shared.health.open_streams());
            if now >= next_read {
                let fresh = Arc::new(reader.read());
                if fresh != inv {
                    log_changes(&inv, &fresh);
                    inv = fresh;
                    shared.set_inventory(Arc::clone(&inv));
                    shared.publish_health(&inv);
                    publisher.want(Arc::clone(&inv));
                    next_health = now + HEALTH_RESEND;
                }
                next_read = now + cfg.health_interval;
            }
            if now >= next_health {
                shared.publish_health(&inv);
                next_health = now + HEALTH_RESEND;
            }
            let deadline = [
                Some(next_read),
                Some(next_health),
                Some(
                    now + if dirs.complete() {
                        SOCKET_CHECK_WATCHED
                    } else {
                        SOCKET_CHECK
                    },
                ),
                sockets.retry_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let mut fds = vec![
                signals.as_raw_fd(),
                registered.as_raw_fd(),
                stream_left.as_raw_fd(),
            ];
            fds.extend(dirs.fd());
            let devices_at = fds.len();
            fds.extend(devices.fd());
            let timeout = deadline.map(|t| t.saturating_duration_since(Instant::now()));
            let ready = sys::poll_readable(&fds, timeout).map_err(|source| Error::Setup {
                what: "poll",
                source,
            })?;
            if ready[0] {
                while let Ok(Some(sig)) = signals.read() {
                    if sig == libc::SIGHUP {
                        // Read the host now and look at the slice again.
                        info!("SIGHUP: reading the host and checking the ResourceSlice now");
                        next_read = Instant::now();
                        publisher.registered();
                        continue;
                    }
                    sys::arm_exit_watchdog(sys::EXIT_WATCHDOG_SECS);
                    info!("signal {sig} received: stopping");
                    return Ok(());
                }
            }
            if ready[1] {
                registered.drain();
                publisher.registered();
            }
            sockets.check_registered(&observer, &reg_socket);
            if ready[2] {
                stream_left.drain();
                debug!("a health stream ended");
            }
            if dirs.fd().is_some() && ready.get(3) == Some(&true) {
                // Whatever changed there, the sockets are looked at at the top of the loop.
                dirs.drain();
            }
            if devices.fd().is_some() && ready.get(devices_at) == Some(&true) {
                devices.drain();
                next_read = Instant::now();
            }
        }
    })();
    // The registration socket first: the kubelet stops calling a driver it deregistered. The
    // claims' CDI specs stay (running pods' containers restart with them); the slice too (the
    // kubelet wipes it 30 s after we are gone, and a rolling update comes back before that).
    sockets.registration.take();
    shared.health.stop();
    sockets.service.take();
    drop(publisher);
    result
}

/// Our two sockets, served and made again when they go.
struct Sockets {
    service: Option<Listener>,
    registration: Option<Listener>,
    retry_at: Option<Instant>,
    /// Since when the registration socket has waited for a kubelet, and whether that was
    /// told as a notice.
    waiting: Option<(Instant, bool)>,
}

impl Sockets {
    fn ensure(
        &mut self,
        grpc: &mut Grpc,
        shared: &Arc<Shared>,
        endpoint: &Path,
        reg_socket: &Path,
        now: Instant,
    ) -> Result<(), Error> {
        if self.retry_at.is_some_and(|t| t > now) {
            return Ok(());
        }
        self.retry_at = None;
        if self.service.as_ref().is_some_and(|l| !l.owns_socket()) {
            warn!(
                "{} is gone or replaced: serving it again",
                endpoint.display()
            );
            self.service = None;
            // The kubelet must learn the new socket: register again.
            self.registration = None;
        }
        if self.registration.as_ref().is_some_and(|l| !l.owns_socket()) {
            warn!(
                "{} is gone or replaced: registering again",
                reg_socket.display()
            );
            self.registration = None;
        }
        let env = grpc.env();
        if self.service.is_none() {
            match serve(&env, shared, endpoint, true) {
                Ok(l) => self.service = Some(l),
                Err(e) => return self.failed(e, now),
            }
        }
        if self.registration.is_none() {
            match serve(&env, shared, reg_socket, false) {
                Ok(l) => {
                    info!("registration socket {} is up", reg_socket.display());
                    self.registration = Some(l);
                    self.waiting = Some((now, false));
                    shared.unregistered();
                }
                Err(e) => return self.failed(e, now),
            }
        }
        Ok(())
    }

    /// A registration socket no kubelet registered us through for a minute is a notice (the
    /// kubelet dials it within a second of its creation).
    fn check_registered(&mut self, observer: &Observer, reg_socket: &Path) {
        if observer.registered_any() {
            self.waiting = None;
            return;
        }
        if let Some((since, told @ false)) = &mut self.waiting {
            if since.elapsed() >= crate::observe::REGISTRATION_FAILING_AFTER {
                *told = true;
                let why = format!(
                    "no kubelet registered the DRA driver through {} for {} s: is --kubelet-registry-dir the kubelet's plugins_registry, and DRA on in this kubelet?",
                    reg_socket.display(),
                    since.elapsed().as_secs()
                );
                warn!("{why}");
                observer.notice(Severity::Warning, "RdmaRegistrationFailing", why);
            }
        }
    }

    fn failed(&mut self, e: server::Error, now: Instant) -> Result<(), Error> {
        if let server::Error::InUse { .. } = e {
            return Err(Error::Serve(e));
        }
        warn!("{e}; trying again in 5 s");
        self.retry_at = Some(now + Duration::from_secs(5));
        Ok(())
    }
}

/// Serves the DRA services (`service`) or the registration service at `socket`.
fn serve(
    env: &Arc<grpcio::Environment>,
    shared: &Arc<Shared>,
    socket: &Path,
    service: bool,
) -> Result<Listener, server::Error> {
    if let Some(dir) = socket.parent() {
        // Our own directory under the kubelet's plugins dir; the registry dir is the kubelet's.
        if service && !dir.exists() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                warn!("cannot create {}: {e}", dir.display());
            }
        }
    }
    server::claim(socket)?;
    let services = if service {
        let plugin = Plugin {
            shared: Arc::clone(shared),
        };
        vec![
            dra::create_dra_plugin(plugin.clone()),
            dra_health::create_dra_resource_health(plugin.clone()),
            proto::create_health_v1(plugin),
        ]
    } else {
        vec![pluginregistration::create_registration(Registration {
            shared: Arc::clone(shared),
        })]
    };
    let l = Listener::start(env, services, socket)?;
    if service {
        info!("serving DRA on {}", socket.display());
    }
    Ok(l)
}

fn log_inventory(inv: &Inventory) {
    for d in &inv.devices {
        info!(
            "device {} ({}, {}): {} node(s), {}{}",
            d.name,
            d.resource,
            d.hcas.join(","),
            d.nodes.len(),
            if d.healthy { "Healthy" } else { "Unhealthy: " },
            if d.healthy { "" } else { d.reason.as_str() }
        );
    }
    for r in &inv.refused {
        warn!("not published: {r}");
    }
}

fn log_changes(old: &Inventory, new: &Inventory) {
    for d in &new.devices {
        match old.get(&d.name) {
            Some(o) if o.healthy == d.healthy && o.nodes == d.nodes => {}
            Some(o) if o.healthy && !d.healthy => {
                warn!(
                    "device {} is Unhealthy: {} (tainted NoSchedule)",
                    d.name, d.reason
                )
            }
            Some(o) if !o.healthy && d.healthy => info!("device {} is Healthy again", d.name),
            Some(_) => info!("device {}: its device nodes changed", d.name),
            None => info!("device {} appeared", d.name),
        }
    }
    for o in &old.devices {
        if new.get(&o.name).is_none() {
            info!("device {} is gone", o.name);
        }
    }
}
