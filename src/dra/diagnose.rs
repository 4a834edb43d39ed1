//! `diagnose --frontend dra`: the checks that matter to the DRA front-end besides the host's
//! (which `diagnose` runs for both): the kubelet's registration directory, our two sockets as
//! the kubelet uses them, a device plugin of ours serving the same name (then the scheduler
//! never uses DRA for it here), the API server with our token and RBAC, the CDI directory, and
//! whether the container runtime has CDI on (without it pods start without `/dev/infiniband`).

use std::path::Path;

use crate::config::Config;
use crate::dra::daemon::{device_plugin_rival, node_name};
use crate::dra::probe;
use crate::kube::{self, Kube};
use crate::sys;
use crate::tools::diagnose::{Check, Status};

pub fn checks(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    let reg = &cfg.dra.registry_dir;
    out.push(if reg.is_dir() {
        Check::ok("kubelet", format!("{} exists", reg.display()))
    } else {
        Check::bad(
            "kubelet",
            Status::Fail,
            format!("{} does not exist", reg.display()),
            "the kubelet is not running, or its root dir differs: set --kubelet-registry-dir and --kubelet-plugins-dir (and mount them)",
        )
    });
    out.push(match probe::probe(&cfg.dra) {
        Ok(seen) => Check::ok("driver", seen.trim_end().to_string()),
        Err(e) => Check::bad(
            "driver",
            Status::Fail,
            e,
            "is the driver running? see `kubectl -n jarvice-daemonsets logs ds/rdma-dra-daemonset`",
        ),
    });
    if let Some(why) = device_plugin_rival(cfg) {
        out.push(Check::bad(
            "front-ends",
            Status::Fail,
            why,
            "run one front-end per resource name on a node: delete the device-plugin DaemonSet here, or give the two DaemonSets nodeSelectors that exclude each other",
        ));
    } else {
        out.push(Check::ok(
            "front-ends",
            "no device plugin of ours serves these names here".to_string(),
        ));
    }
    out.extend(api(cfg));
    out.push(if sys::may_write(&cfg.cdi_dir) {
        Check::ok("cdi dir", format!("{} is writable", cfg.cdi_dir.display()))
    } else {
        Check::bad(
            "cdi dir",
            Status::Fail,
            format!("{} is missing or not writable", cfg.cdi_dir.display()),
            "mount the host's /var/run/cdi read-write at --cdi-dir",
        )
    });
    out.push(runtime_cdi(&cfg.host_root));
    out
}

/// The API server answers our token, and RBAC lets us read our Node and list our slices.
fn api(cfg: &Config) -> Vec<Check> {
    let node = match node_name(cfg) {
        Ok(n) => n,
        Err(e) => {
            return vec![Check::bad(
                "api",
                Status::Fail,
                e.to_string(),
                "set NODE_NAME from the downward API (spec.nodeName) or pass --node-name",
            )]
        }
    };
    let k = match Kube::new(&cfg.dra) {
        Ok(k) => k,
        Err(e) => {
            return vec![Check::bad(
                "api",
                Status::Fail,
                e.to_string(),
                "run in the driver's pod (in-cluster config) or pass --kube-api, --kube-token-file and --kube-ca-file",
            )]
        }
    };
    let fix = |e: &kube::Error| match e.code() {
        Some(401) => {
            "the API server rejects our token: check the service account and --kube-token-file"
        }
        Some(403) => "RBAC: apply the ClusterRole and binding of deploy/rdma-dra.yml",
        Some(404) => {
            "this cluster has no resource.k8s.io/v1 (Kubernetes 1.34+), or the node name is wrong"
        }
        _ => "check --kube-api, --kube-ca-file and the network to the API server",
    };
    let mut out = Vec::new();
    for (what, path) in [
        ("node", format!("/api/v1/nodes/{}", kube::escape(&node))),
        (
            "slices",
            format!(
                "/apis/resource.k8s.io/v1/resourceslices?fieldSelector={}",
                kube::escape(&format!(
                    "spec.nodeName={node},spec.driver={}",
                    cfg.dra.driver
                ))
            ),
        ),
    ] {
        out.push(match k.get::<serde_json::Value>(&path) {
            Ok(v) => Check::ok(
                "api",
                match what {
                    "node" => format!("{} answers: node {node} is there", k.base()),
                    _ => format!(
                        "{} ResourceSlice(s) of {} on {node}",
                        v["items"].as_array().map_or(0, Vec::len),
                        cfg.dra.driver
                    ),
                },
            ),
            Err(e) => Check::bad("api", Status::Fail, format!("{what}: {e}"), fix(&e)),
        });
    }
    out
}

/// What the host's runtime configuration says of CDI, where `--host-root` shows it.
fn runtime_cdi(root: &Path) -> Check {
    let containerd = root.join("etc/containerd/config.toml");
    if let Ok(text) = std::fs::read_to_string(&containerd) {
        let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if t.contains("enable_cdi=false") {
            return Check::bad(
                "runtime cdi",
                Status::Fail,
                format!("{} sets enable_cdi = false", containerd.display()),
                "set enable_cdi = true in the CRI plugin's section and restart containerd: without CDI, pods start without /dev/infiniband",
            );
        }
        if t.contains("enable_cdi=true") || t.contains("version=3") {
            return Check::ok(
                "runtime cdi",
                format!(
                    "{}: CDI on (enable_cdi, or containerd 2.x)",
                    containerd.display()
                ),
            );
        }
        return Check::bad(
            "runtime cdi",
            Status::Warn,
            format!("{} does not turn CDI on", containerd.display()),
            "containerd 1.7 needs enable_cdi = true (2.0+ has it on); check with `crictl info | grep -i cdi`",
        );
    }
    if root.join("etc/crio").is_dir() {
        return Check::ok("runtime cdi", "CRI-O (CDI always on)".to_string());
    }
    Check::bad(
        "runtime cdi",
        Status::Warn,
        format!(
            "cannot tell: no containerd or CRI-O configuration under {}",
            root.display()
        ),
        "check on the node: `crictl info | grep -i cdi` must show CDI enabled (containerd 2.0+, 1.7 with enable_cdi = true, CRI-O); without it pods start without /dev/infiniband",
    )
}
