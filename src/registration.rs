//! Registers the plugin with the kubelet through grpcio's blocking client.
//!
//! The kubelet dials our socket and calls GetDevicePluginOptions *before* it answers Register
//! (`plugin/v1beta1/server.go`), so our server must already be running; the Register call runs on
//! a thread of its own so the main loop keeps handling signals and events while it waits.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use grpcio::{CallOption, ChannelBuilder, Environment};

use crate::api;
use crate::plugin;

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
    req.options = Some(plugin::options()).into();
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
