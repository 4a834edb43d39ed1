//! One serving generation: a grpcio server on `<plugin-dir>/<socket-name>` with its [`Hub`].
//! Stopping it ends its streams, shuts the server down completely and removes the socket, so a
//! restart never leaks a server (the original's bug 5).

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
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
        }
    }
}

impl std::error::Error for Error {}

/// A running server; dropping it stops it.
pub struct Serving {
    server: Option<Server>,
    hub: Arc<Hub>,
    socket: PathBuf,
    /// Device and inode of the socket file we bound.
    identity: Option<(u64, u64)>,
}

/// Device and inode of the socket at `path` (`None`: absent, or not a socket).
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
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
        server
            .add_listening_port(
                format!("unix:{}", socket.display()),
                ServerCredentials::insecure(),
            )
            .map_err(|source| Error::Listen {
                path: socket.to_path_buf(),
                source,
            })?;
        server.start();
        // Which file is ours: at exit we remove only that one, never a file another process
        // put at the same path after ours was deleted.
        let identity = socket_identity(socket);
        if identity.is_none() {
            warn!("{} vanished right after bind", socket.display());
        }
        info!("serving the device plugin on {}", socket.display());
        Ok(Serving {
            server: Some(server),
            hub,
            socket: socket.to_path_buf(),
            identity,
        })
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
        // finds it gone, and nobody dials a server that is stopping.
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
