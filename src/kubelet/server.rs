//! One serving generation: a grpcio server ([`Listener`]) on `<plugin-dir>/<socket-name>` with
//! its [`Hub`].
//! Stopping it ends its streams, shuts the server down completely and removes the socket, so a
//! restart never leaks a server (the original's bug 5).
//!
//! The socket path is ours only while the file there is the socket we bound. gRPC C-core
//! unlinks whatever socket sits at its listening path when it binds and again when it shuts
//! down (`tcp_server_posix.cc`: `grpc_unlink_if_unix_domain_socket` in `add_port` and
//! `deactivated_all_ports`), which would delete another process's socket that took our path
//! meanwhile. So gRPC listens on a private name in the same directory (`.jrp.` and 64 random
//! bits: in a DaemonSet every instance is PID 1, so a PID would not tell two pods apart), and we
//! give the socket its public name with link(2), which never replaces a file, then drop the
//! private name: gRPC's unlinks find nothing, and we remove the public name only while it is
//! still the socket we bound (its device and inode, taken from the private name before the
//! link: a bound socket keeps its inode alive, so the number cannot be reused meanwhile).

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grpcio::{ChannelBuilder, Environment, Server, ServerBuilder, ServerCredentials};
use log::{debug, info, warn};

use crate::kubelet::api;
use crate::kubelet::service::{Plugin, Settings};
use crate::kubelet::stream::Hub;
use crate::sys::{self, EventFd};
use crate::wake;

/// The largest request we read: the kubelet's largest (4,096 IDs in one Allocate) is ~60 KiB,
/// and gRPC's default (4 MiB) would let one call cost us far more memory than our limit allows.
pub const MAX_REQUEST_BYTES: i32 = 1 << 20;
/// Concurrent calls per connection (gRPC's default is unbounded).
const MAX_CONCURRENT_CALLS: i32 = 64;
/// How long a stop waits for in-flight calls before cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub enum Error {
    /// Something answers on the socket: another plugin instance is running.
    InUse {
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    RemoveStale {
        path: PathBuf,
        source: io::Error,
    },
    /// A socket at our path that we cannot tell to be stale (connecting failed otherwise than
    /// "refused": EACCES from another user's socket, say): left alone.
    Unclear {
        path: PathBuf,
        source: io::Error,
    },
    /// Something other than a socket sits at our socket path.
    NotSocket {
        path: PathBuf,
    },
    Build {
        source: grpcio::Error,
    },
    Listen {
        path: PathBuf,
        source: grpcio::Error,
    },
    /// The listening socket could not be given its public name.
    Publish {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InUse { path } => write!(
                f,
                "{} answers connections: another plugin instance is serving it",
                path.display()
            ),
            Error::RemoveStale { path, source } => {
                write!(f, "cannot remove stale socket {}: {source}", path.display())
            }
            Error::Unclear { path, source } => write!(
                f,
                "{} is a socket we cannot connect to ({source}): someone else's, leaving it alone",
                path.display()
            ),
            Error::NotSocket { path } => write!(
                f,
                "{} exists and is not a socket: refusing to remove it",
                path.display()
            ),
            Error::Build { source } => write!(f, "cannot build the gRPC server: {source}"),
            Error::Listen { path, source } => {
                write!(f, "cannot listen on {}: {source}", path.display())
            }
            Error::Publish { path, source } => {
                write!(f, "cannot make our socket {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {}

/// A running device-plugin server; dropping it stops it.
pub struct Serving {
    listener: Listener,
    hub: Arc<Hub>,
}

/// A grpcio server listening on one socket path, which it owns only while the file there is
/// the socket it bound. Dropping it stops it. The device plugin has one; the DRA front-end one
/// for its registration socket and one for `dra.sock`.
pub struct Listener {
    server: Option<Server>,
    socket: PathBuf,
    /// The socket file we bound, as it was once published.
    identity: Option<Identity>,
    /// Set once we removed it ourselves (withdrawn before the server stops).
    removed: std::cell::Cell<bool>,
}

/// What tells our socket file from another at the same path: device and inode. File systems
/// reuse a deleted file's inode number, but not while our bound socket holds the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
}

/// The identity of the socket at `path` (`None`: absent, or not a socket).
pub fn socket_identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| Identity {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The private name's length: `.jrp.` and 16 hex digits.
pub const PRIVATE_NAME_MAX: usize = 5 + 16;

/// The private name gRPC listens on, next to `socket`: hidden, and unique to this server while
/// it exists (a few microseconds) across every process and container on the node (64 random
/// bits), so gRPC's unlink at bind meets nobody's socket (the kubelet removes leftovers at its
/// start; its plugin watcher ignores names starting with `.`).
fn private_path(socket: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    // getrandom(2); should it fail, the time and a counter still differ between instances.
    let bits = sys::random_u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(48)
    });
    socket.with_file_name(format!(".jrp.{bits:016x}"))
}

/// Gives the socket bound at `private` the name `socket`: link(2) fails with `EEXIST` rather
/// than replace whatever someone put there since [`claim`]. The private name goes either way.
fn publish(private: &Path, socket: &Path) -> Result<Identity, Error> {
    // Ours, taken where nobody else can have put a file: after the link the public name may
    // already be someone else's again.
    let bound = socket_identity(private).ok_or_else(|| Error::Publish {
        path: private.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            "our socket vanished right after bind",
        ),
    });
    let linked = bound.and_then(|id| {
        std::fs::hard_link(private, socket).map_err(|source| Error::Publish {
            path: socket.to_path_buf(),
            source,
        })?;
        Ok(id)
    });
    if let Err(e) = std::fs::remove_file(private) {
        debug!("cannot remove {}: {e}", private.display());
    }
    match linked {
        // Someone took the path between claim and now: theirs, not ours to remove.
        Err(Error::Publish { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            Err(if matches!(sys::socket_answers(socket), Ok(true)) {
                Error::InUse {
                    path: socket.to_path_buf(),
                }
            } else {
                Error::Publish {
                    path: socket.to_path_buf(),
                    source,
                }
            })
        }
        other => other,
    }
}

impl Serving {
    /// Claims `socket` (removing a stale file left by a crashed instance) and serves there.
    pub fn start(
        env: &Arc<Environment>,
        settings: &Arc<Settings>,
        socket: &Path,
        list: api::ListAndWatchResponse,
        client_left: &Arc<EventFd>,
    ) -> Result<Serving, Error> {
        claim(socket)?;
        let hub = Hub::new(list, Arc::clone(client_left));
        let service =
            api::create_device_plugin(Plugin::new(Arc::clone(settings), Arc::clone(&hub)));
        let listener = Listener::start(env, vec![service], socket)?;
        info!("serving the device plugin on {}", socket.display());
        Ok(Serving { listener, hub })
    }

    /// True while the file at our socket path is the socket this server bound.
    pub fn owns_socket(&self) -> bool {
        self.listener.owns_socket()
    }

    /// Where this generation's device list is published.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Ends the streams, shuts the server down (cancelling calls still running after a short
    /// grace) and removes the socket file.
    pub fn stop(mut self) {
        let hub = Arc::clone(&self.hub);
        self.listener.shutdown(|| hub.stop());
    }

    /// Removes our socket file, and only ours (the kubelet may have replaced it with nothing,
    /// or someone with a file of their own). The server keeps running for the calls under way.
    pub fn remove_socket(&self) {
        self.listener.remove_socket();
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let hub = Arc::clone(&self.hub);
        self.listener.shutdown(|| hub.stop());
    }
}

impl Listener {
    /// Serves `services` at `socket`, which [`claim`] must have made free: gRPC binds a private
    /// name and the socket gets its public name with link(2), never replacing a file.
    pub fn start(
        env: &Arc<Environment>,
        services: Vec<grpcio::Service>,
        socket: &Path,
    ) -> Result<Listener, Error> {
        let args = ChannelBuilder::new(Arc::clone(env))
            .max_receive_message_len(MAX_REQUEST_BYTES)
            .max_concurrent_stream(MAX_CONCURRENT_CALLS)
            .build_args();
        let mut builder = ServerBuilder::new(Arc::clone(env)).channel_args(args);
        for s in services {
            builder = builder.register_service(s);
        }
        let mut server = builder.build().map_err(|source| Error::Build { source })?;
        let private = private_path(socket);
        server
            .add_listening_port(
                format!("unix:{}", private.display()),
                ServerCredentials::insecure(),
            )
            .map_err(|source| Error::Listen {
                path: private.clone(),
                source,
            })?;
        server.start();
        let mut listener = Listener {
            server: Some(server),
            socket: socket.to_path_buf(),
            identity: None,
            removed: std::cell::Cell::new(false),
        };
        // Which file is ours: we remove only that one, never a file another process put at
        // the same path after ours was deleted. On failure, dropping `listener` stops gRPC.
        listener.identity = Some(publish(&private, socket)?);
        Ok(listener)
    }

    /// Where it listens.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True while the file at our socket path is the socket this server bound.
    pub fn owns_socket(&self) -> bool {
        self.identity.is_some() && socket_identity(&self.socket) == self.identity
    }

    /// Ends the server: the socket goes, then `first` runs (ending streams), then gRPC's
    /// shutdown (cancelling calls still running after a short grace).
    pub fn shutdown(&mut self, first: impl FnOnce()) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        // The socket goes first: if gRPC cannot shut down cleanly, the exit watchdog still
        // finds it gone, and nobody dials a server that is stopping. gRPC's own unlink at
        // shutdown is of the private name, long gone.
        self.remove_socket();
        first();
        // gRPC short of threads may never finish this: a SIGTERM meanwhile must still end us.
        sys::stoppable(|| {
            let done = server.shutdown();
            if wake::block_on(done, Some(SHUTDOWN_GRACE)).is_none() {
                debug!("calls still running after {SHUTDOWN_GRACE:?}: cancelling them");
                server.cancel_all_calls();
            }
            drop(server);
        });
        info!("stopped serving on {}", self.socket.display());
    }

    /// Removes our socket file, and only ours. The server keeps running for the calls under way.
    pub fn remove_socket(&self) {
        if self.removed.get() {
            return;
        }
        if !self.owns_socket() {
            debug!(
                "{} is no longer our socket: leaving it alone",
                self.socket.display()
            );
            return;
        }
        match std::fs::remove_file(&self.socket) {
            Ok(()) => self.removed.set(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", self.socket.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown(|| {});
    }
}

/// Makes `socket` free to bind: absent is fine; a socket nobody answers on is stale and
/// removed; a socket that accepts connections belongs to a live instance and is left alone, and
/// so is anything that is not a socket (we never delete a file we did not make).
pub fn claim(socket: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::RemoveStale {
                path: socket.to_path_buf(),
                source,
            })
        }
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotSocket {
            path: socket.to_path_buf(),
        });
    }
    // Stale only when the kernel says nobody listens (ECONNREFUSED): any other failure (EACCES
    // from another user's socket, with every capability dropped) is no proof, and the file is
    // not ours to remove.
    match sys::socket_answers(socket) {
        Ok(true) => {
            return Err(Error::InUse {
                path: socket.to_path_buf(),
            })
        }
        Ok(false) => {}
        Err(source) => {
            return Err(Error::Unclear {
                path: socket.to_path_buf(),
                source,
            })
        }
    }
    info!("removing stale socket {}", socket.display());
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::RemoveStale {
            path: socket.to_path_buf(),
            source,
        }),
    }
}
