//! `probe --frontend dra`: checks the two sockets as the kubelet uses them: `GetInfo` on the
//! registration socket (type, name, endpoint), then an empty `NodePrepareResources` on the
//! endpoint it names (what the Go helper's drivers use for liveness). No API server involved:
//! a probe must not restart the pod because the control plane is slow.

use std::path::Path;
use std::sync::Arc;

use grpcio::{CallOption, ChannelBuilder, EnvBuilder};

use crate::config::DraConfig;
use crate::dra::proto::{dra, pluginregistration as reg};
use crate::tools::probe::PROBE_TIMEOUT;

/// What the probe saw, or why it failed.
pub fn probe(cfg: &DraConfig) -> Result<String, String> {
    let reg_socket = cfg.registration_socket();
    if !reg_socket.exists() {
        return Err(format!(
            "{} does not exist: driver not registered",
            reg_socket.display()
        ));
    }
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("probe").build());
    let channel = |socket: &Path| {
        ChannelBuilder::new(Arc::clone(&env))
            .default_authority("localhost")
            .connect(&format!("unix:{}", socket.display()))
    };
    let opt = || CallOption::default().timeout(PROBE_TIMEOUT);
    let info = reg::RegistrationClient::new(channel(&reg_socket))
        .get_info_opt(&reg::InfoRequest::new(), opt())
        .map_err(|e| format!("GetInfo on {}: {e}", reg_socket.display()))?;
    if info.type_ != "DRAPlugin" || info.name != cfg.driver {
        return Err(format!(
            "GetInfo says type {:?}, name {:?}: not DRA driver {}",
            info.type_, info.name, cfg.driver
        ));
    }
    let endpoint = Path::new(&info.endpoint);
    dra::DraPluginClient::new(channel(endpoint))
        .node_prepare_resources_opt(&dra::NodePrepareResourcesRequest::new(), opt())
        .map_err(|e| format!("NodePrepareResources on {}: {e}", endpoint.display()))?;
    Ok(format!(
        "registration {}: DRAPlugin {} at {} ({})\n",
        reg_socket.display(),
        info.name,
        info.endpoint,
        info.supported_versions.join(", ")
    ))
}
