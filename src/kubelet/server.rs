//! One serving generation: a grpcio server on `<plugin-dir>/<socket-name>` with its [`Hub`].
//! Stopping it ends its streams, shuts the server down completely and removes the socket, so a
//! restart never leaks a server (the original's bug 5).
//!
//! The socket path is ours only while the file there is the socket we bound. gRPC C-core
//! unlinks whatever socket sits at its listening path when it binds and again when it shuts
//! down (`tcp_server_posix.cc`: `grpc_unlink_if_unix_domain_socket` in `add_port` and
//! `deactivated_all_ports`), which would delete another process's socket that took our path
//! meanwhile. So gRPC listens on a private name in the same directory
//! (`.<socket>.<pid>.<n>`), and we give the socket its public name with link(2), which never
//! replaces a file, then drop the private name: gRPC's unlinks find nothing, and we remove the
//! public name only while it is still the file we linked (device, inode and change time).

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

/// A running server; dropping it stops it.
pub struct Serving {
    server: Option<Server>,
    hub: Arc<Hub>,
    socket: PathBuf,
    /// The socket file we bound, as it was once published.
    identity: Option<Identity>,
}

/// What tells our socket file from another at the same path: device and inode, and the change
/// time, because a file system reuses a deleted file's inode number (ext4 and xfs do at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

/// The identity of the socket at `path` (`None`: absent, or not a socket).
pub fn socket_identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| Identity {
        dev: m.dev(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The longest private name: `.jrp.` and a pid (at most 7 digits, `pid_max` 4194304), `.` and
/// a counter below 10,000.
pub const PRIVATE_NAME_MAX: usize = 5 + 7 + 1 + 4;

/// The private name gRPC listens on, next to `socket`: hidden and unique to this process and
/// server while it exists (a few microseconds), so no other process has a file there (the
/// kubelet removes leftovers at its start).
fn private_path(socket: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    socket.with_file_name(format!(
        ".jrp.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed) % 10_000
    ))
}

/// Gives the socket bound at `private` the name `socket`: link(2) fails with `EEXIST` rather
/// than replace whatever someone put there since [`claim`]. The private name goes either way.
fn publish(private: &Path, socket: &Path) -> Result<Identity, Error> {
    let linked = std::fs::hard_link(private, socket);
    if let Err(e) = std::fs::remove_file(private) {
        debug!("cannot remove {}: {e}", private.display());
    }
    match linked {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Someone took the path between claim and now: theirs, not ours to remove.
            Err(if sys::socket_answers(socket).unwrap_or(false) {
                Error::InUse {
                    path: socket.to_path_buf(),
                }
            } else {
                Error::Publish {
                    path: socket.to_path_buf(),
                    source: e,
                }
            })
        }
        Err(source) => Err(Error::Publish {
            path: socket.to_path_buf(),
            source,
        }),
        // Read after the private name is gone: unlinking it changed the change time.
        Ok(()) => socket_identity(socket).ok_or_else(|| Error::Publish {
            path: socket.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "vanished right after link"),
        }),
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
        let args = ChannelBuilder::new(Arc::clone(env))
            .max_receive_message_len(MAX_REQUEST_BYTES)
            .max_concurrent_stream(MAX_CONCURRENT_CALLS)
            .build_args();
        let mut server = ServerBuilder::new(Arc::clone(env))
            .channel_args(args)
            .register_service(service)
            .build()
            .map_err(|source| Error::Build { source })?;
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
        let mut serving = Serving {
            server: Some(server),
            hub,
            socket: socket.to_path_buf(),
            identity: None,
        };
        // Which file is ours: we remove only that one, never a file another process put at
        // the same path after ours was deleted. On failure, dropping `serving` stops gRPC.
        serving.identity = Some(publish(&private, socket)?);
        info!("serving the device plugin on {}", socket.display());
        Ok(serving)
    }

    /// True while the file at our socket path is the socket this server bound.
    pub fn owns_socket(&self) -> bool {
        self.identity.is_some() && socket_identity(&self.socket) == self.identity
    }

    /// Where this generation's device list is published.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Ends the streams, shuts the server down (cancelling calls still running after a short
    /// grace) and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        // The socket goes first: if gRPC cannot shut down cleanly, the exit watchdog still
        // finds it gone, and nobody dials a server that is stopping. gRPC's own unlink at
        // shutdown is of the private name, long gone.
        self.remove_socket();
        self.hub.stop();
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

    /// Removes our socket file, and only ours (the kubelet may have replaced it with nothing,
    /// or someone with a file of their own). The server keeps running for the calls under way.
    pub fn remove_socket(&self) {
        if !self.owns_socket() {
            debug!(
                "{} is no longer our socket: leaving it alone",
                self.socket.display()
            );
            return;
        }
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", self.socket.display()),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.shutdown();
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
    if sys::socket_answers(socket).unwrap_or(false) {
        return Err(Error::InUse {
            path: socket.to_path_buf(),
        });
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
