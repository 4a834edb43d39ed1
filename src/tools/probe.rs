//! `jarvice-rdma-plugin probe`: dials the running plugin's socket the way the kubelet does
//! (GetDevicePluginOptions, then the first ListAndWatch list) and says what it saw. Used by the
//! DaemonSet's liveness and readiness probes, which can run no shell in a `scratch` image.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};

use crate::kubelet::api;
use crate::resource::{HEALTHY, UNHEALTHY};
use crate::wake;

/// Per call; two calls stay inside the DaemonSet probes' 5 s timeoutSeconds.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub enum Error {
    NoSocket {
        path: PathBuf,
    },
    Rpc {
        rpc: &'static str,
        source: grpcio::Error,
    },
    Timeout {
        rpc: &'static str,
    },
    StreamEnded,
    BadDevice {
        id: String,
        health: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoSocket { path } => {
                write!(
                    f,
                    "{} does not exist: plugin not serving (it serves only while the kubelet's kubelet.sock is there)",
                    path.display()
                )
            }
            Error::Rpc { rpc, source } => write!(f, "{rpc} failed: {source}"),
            Error::Timeout { rpc } => write!(f, "{rpc} gave no answer within {PROBE_TIMEOUT:?}"),
            Error::StreamEnded => write!(f, "ListAndWatch ended before sending a device list"),
            Error::BadDevice { id, health } => {
                write!(f, "device {id:?} has health {health:?}; the kubelet expects {HEALTHY:?} or {UNHEALTHY:?}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// What the plugin answered.
pub struct Seen {
    pub options: api::DevicePluginOptions,
    pub list: api::ListAndWatchResponse,
}

/// Calls the plugin on `socket` like the kubelet does (authority `localhost`, kubelet >= 1.26).
pub fn probe(socket: &Path) -> Result<Seen, Error> {
    if !socket.exists() {
        return Err(Error::NoSocket {
            path: socket.to_path_buf(),
        });
    }
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("probe").build());
    let channel = ChannelBuilder::new(env)
        .default_authority("localhost")
        .connect(&format!("unix:{}", socket.display()));
    let client = api::DevicePluginClient::new(channel);
    let opt = || CallOption::default().timeout(PROBE_TIMEOUT);
    let options = client
        .get_device_plugin_options_opt(&api::Empty::new(), opt())
        .map_err(|source| Error::Rpc {
            rpc: "GetDevicePluginOptions",
            source,
        })?;
    let mut stream = client
        .list_and_watch_opt(&api::Empty::new(), opt())
        .map_err(|source| Error::Rpc {
            rpc: "ListAndWatch",
            source,
        })?;
    let first = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx));
    let list = match wake::block_on(first, Some(PROBE_TIMEOUT)) {
        None => {
            return Err(Error::Timeout {
                rpc: "ListAndWatch",
            })
        }
        Some(None) => return Err(Error::StreamEnded),
        Some(Some(Err(source))) => {
            return Err(Error::Rpc {
                rpc: "ListAndWatch",
                source,
            })
        }
        Some(Some(Ok(list))) => list,
    };
    stream.cancel();
    for d in &list.devices {
        if d.ID.is_empty() || (d.health != HEALTHY && d.health != UNHEALTHY) {
            return Err(Error::BadDevice {
                id: d.ID.clone(),
                health: d.health.clone(),
            });
        }
    }
    Ok(Seen { options, list })
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "options: pre_start_required={} get_preferred_allocation_available={}",
            self.options.pre_start_required, self.options.get_preferred_allocation_available
        )?;
        for d in &self.list.devices {
            let numa: Vec<String> = d.topology.nodes.iter().map(|n| n.ID.to_string()).collect();
            writeln!(f, "device {} {} numa=[{}]", d.ID, d.health, numa.join(","))?;
        }
        Ok(())
    }
}
