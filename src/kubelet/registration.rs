//! Registers the plugin with the kubelet through grpcio's blocking client.
//!
//! The kubelet dials our socket and calls GetDevicePluginOptions *before* it answers Register
//! (`plugin/v1beta1/server.go`), so our server must already be running; the Register call runs on
//! a thread of its own so the main loop keeps handling signals and events while it waits.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use grpcio::{CallOption, ChannelBuilder, Environment};
use log::{debug, warn};

use crate::config::Config;
use crate::kubelet::api;
use crate::kubelet::service;
use crate::sys::EventFd;

/// The kubelet's own socket in the plugin dir; created anew on every kubelet start.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

#[derive(Debug)]
pub enum Error {
    /// `kubelet.sock` does not exist (kubelet not running, or a different --plugin-dir).
    NoKubelet { path: PathBuf },
    Rpc {
        path: PathBuf,
        source: grpcio::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoKubelet { path } => {
                write!(
                    f,
                    "{} does not exist: is the kubelet running?",
                    path.display()
                )
            }
            Error::Rpc { path, source } => {
                write!(f, "Register on {} failed: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {}

/// The request the kubelet expects: version v1beta1, our socket's *basename*, our resource.
pub fn request(socket_name: &str, resource_name: &str) -> api::RegisterRequest {
    let mut req = api::RegisterRequest::new();
    req.version = "v1beta1".to_string();
    req.endpoint = socket_name.to_string();
    req.resource_name = resource_name.to_string();
    req.options = Some(service::options()).into();
    req
}

/// One blocking Register call on `kubelet_socket`.
pub fn register(
    env: &Arc<Environment>,
    kubelet_socket: &Path,
    req: &api::RegisterRequest,
    timeout: Duration,
) -> Result<(), Error> {
    if !kubelet_socket.exists() {
        return Err(Error::NoKubelet {
            path: kubelet_socket.to_path_buf(),
        });
    }
    let channel = ChannelBuilder::new(Arc::clone(env))
        // A kubelet restart replaces the socket: never reuse a connection to the old one.
        .use_local_subchannel_pool(true)
        .connect(&format!("unix:{}", kubelet_socket.display()));
    let client = api::RegistrationClient::new(channel);
    client
        .register_opt(req, CallOption::default().timeout(timeout))
        .map(drop)
        .map_err(|source| Error::Rpc {
            path: kubelet_socket.to_path_buf(),
            source,
        })
}

/// The identity of the kubelet.sock we registered with: a restarted kubelet makes a new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeletId {
    dev: u64,
    ino: u64,
    /// Set when the socket was bound and never changed after (unlike ctime, which a chmod,
    /// chown or hard link moves): tells a new kubelet.sock on a reused inode from the old one.
    mtime_ns: i128,
}

/// The identity of the file at `path` now; `None` when it does not exist.
pub fn kubelet_id(path: &Path) -> Option<KubeletId> {
    let m = fs::metadata(path).ok()?;
    Some(KubeletId {
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

type Outcome = (u64, Option<KubeletId>, Result<(), Error>);

/// Runs Register calls on short-lived threads and reports back through an eventfd, so the main
/// loop never blocks on the kubelet. Only the newest attempt's outcome counts.
pub struct Registrar {
    tx: Sender<Outcome>,
    rx: Receiver<Outcome>,
    wake: Arc<EventFd>,
    attempt: u64,
    /// An attempt is running and its outcome has not been taken yet.
    pub in_flight: bool,
}

impl Registrar {
    pub fn new() -> io::Result<Registrar> {
        let (tx, rx) = mpsc::channel();
        Ok(Registrar {
            tx,
            rx,
            wake: Arc::new(EventFd::new()?),
            attempt: 0,
            in_flight: false,
        })
    }

    /// Starts a Register attempt on its own thread (the daemon runs one at a time; a newer one
    /// would supersede a running one).
    pub fn start(&mut self, env: &Arc<Environment>, cfg: &Config) {
        self.attempt += 1;
        self.in_flight = true;
        let attempt = self.attempt;
        let (env, tx, wake) = (Arc::clone(env), self.tx.clone(), Arc::clone(&self.wake));
        let kubelet = cfg.kubelet_socket();
        let req = request(&cfg.socket_name, &cfg.resource_name);
        let timeout = cfg.register_timeout;
        let spawned = thread::Builder::new()
            .name("register".into())
            .stack_size(crate::workers::STACK_SIZE)
            .spawn(move || {
                let id = kubelet_id(&kubelet);
                let result = register(&env, &kubelet, &req, timeout);
                // The receiver lives as long as the loop; after it is gone nobody needs the answer.
                let _ = tx.send((attempt, id, result));
                wake.notify();
            });
        if let Err(e) = spawned {
            warn!("cannot start a Register thread: {e}");
            let _ = self.tx.send((
                attempt,
                None,
                Err(Error::Rpc {
                    path: cfg.kubelet_socket(),
                    source: grpcio::Error::RemoteStopped,
                }),
            ));
            self.wake.notify();
        }
    }

    /// The outcome of the newest attempt, if it has arrived.
    pub fn outcome(&mut self) -> Option<(Option<KubeletId>, Result<(), Error>)> {
        self.wake.drain();
        let mut newest = None;
        while let Ok((attempt, id, result)) = self.rx.try_recv() {
            if attempt == self.attempt {
                self.in_flight = false;
                newest = Some((id, result));
            } else {
                debug!("ignoring the outcome of superseded Register attempt {attempt}");
            }
        }
        newest
    }
}

impl AsRawFd for Registrar {
    /// Readable when an attempt's outcome has arrived.
    fn as_raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}
