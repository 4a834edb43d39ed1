//! What the resources publish through DRA: one [`DraDevice`] per share (`mode=shared`: each
//! grants every selected HCA, so `jarvice.com/rdma: 1` still means "every HCA of the node") or
//! per HCA (`mode=per-hca`). Pure functions of the daemon's assessments, shared by the slice,
//! the health stream, prepare and `list --frontend dra`.

use std::collections::BTreeMap;

use crate::config::{is_dns_label, Config};
use crate::host::nodes::DeviceNode;
use crate::host::Assessment;
use crate::resource::{per_hca, Devices};

/// Attribute names in our domain are identifiers of at most this many characters.
pub const MAX_ATTRIBUTE_NAME: usize = 32;
/// A string attribute's value holds at most this many characters.
pub const MAX_STRING_VALUE: usize = 64;
/// Attributes and capacities of one device together.
pub const MAX_ATTRIBUTES: usize = 32;
/// The standard attributes (`resource.kubernetes.io/...`) schedulers and other drivers share.
pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
pub const NUMA_NODE: &str = "resource.kubernetes.io/numaNode";

/// One attribute value (the API's `DeviceAttribute`: exactly one of these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// One device as DRA sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DraDevice {
    /// Its name in the slice: a DNS label (`mlx5-0`, `rdma-0`).
    pub name: String,
    /// The resource (`--resource` spec) it belongs to.
    pub resource: String,
    pub per_hca: bool,
    /// The HCAs it grants, by kernel name.
    pub hcas: Vec<String>,
    /// Their ports that count (`mlx5_0:1`), for `UCX_NET_DEVICES` with `--hca-envs`.
    pub ports: Vec<String>,
    /// The device nodes a claim on it gets (verified by the scan, as Allocate grants them).
    pub nodes: Vec<DeviceNode>,
    pub attributes: BTreeMap<String, Attr>,
    pub healthy: bool,
    /// Why it is Unhealthy (or what its health rests on).
    pub reason: String,
}

/// Every device of a node, and the ones left out (with why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub devices: Vec<DraDevice>,
    pub refused: Vec<String>,
}

impl Inventory {
    pub fn get(&self, name: &str) -> Option<&DraDevice> {
        self.devices.iter().find(|d| d.name == name)
    }
}

/// A DNS label for a kernel or device name: lowercase, `_` and other characters outside
/// `[a-z0-9-]` become `-`, trimmed of `-` at both ends, at most 63 characters (`mlx5_0` ->
/// `mlx5-0`). `None` when nothing is left.
pub fn dns_label(raw: &str) -> Option<String> {
    let mapped: String = raw
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let mut s = mapped.trim_matches('-').to_string();
    s.truncate(63);
    let s = s.trim_end_matches('-').to_string();
    is_dns_label(&s, 63).then_some(s)
}

/// The devices of every resource, from one assessment each (`units[i]` with `assessments[i]`).
/// Names that collide (two HCAs whose names map to one label, a share named like an HCA) are
/// refused, every holder of the name: granting either could hand out the other.
pub fn inventory(units: &[(&Config, &Assessment)]) -> Inventory {
    let mut all: Vec<DraDevice> = Vec::new();
    let mut refused = Vec::new();
    for (cfg, a) in units {
        for d in resource_devices(cfg, a, &mut refused) {
            all.push(d);
        }
    }
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for d in &all {
        *count.entry(d.name.clone()).or_default() += 1;
    }
    all.retain(|d| {
        if count[&d.name] > 1 {
            refused.push(format!(
                "{} of {} ({}): its DRA name {} is taken by another device",
                if d.per_hca { "HCA" } else { "share" },
                d.resource,
                d.hcas.join(","),
                d.name
            ));
            return false;
        }
        true
    });
    Inventory {
        devices: all,
        refused,
    }
}

fn resource_devices(cfg: &Config, a: &Assessment, refused: &mut Vec<String>) -> Vec<DraDevice> {
    match cfg.resource() {
        Devices::Shared(r) => r
            .ids()
            .iter()
            .filter_map(|id| {
                let Some(name) = dns_label(id) else {
                    refused.push(format!(
                        "share {id:?} of {}: no DNS label",
                        cfg.resource_name
                    ));
                    return None;
                };
                let mut attributes = BTreeMap::new();
                common(&mut attributes, cfg, "shared");
                put(
                    &mut attributes,
                    "hcaCount",
                    Attr::Int(a.grant.hcas.len() as i64),
                );
                put_str(&mut attributes, "hcas", &a.grant.hcas.join(","));
                Some(DraDevice {
                    name,
                    resource: cfg.resource_name.clone(),
                    per_hca: false,
                    hcas: a.grant.hcas.clone(),
                    ports: a
                        .grant
                        .hcas
                        .iter()
                        .filter_map(|h| a.host.hcas.get(h))
                        .flat_map(|h| counted_ports(h, a))
                        .collect(),
                    nodes: a.grant.nodes.nodes.clone(),
                    attributes,
                    healthy: a.health.healthy,
                    reason: a.health.reason.clone(),
                })
            })
            .collect(),
        Devices::PerHca(_) => per_hca::devices(&a.host, &a.grant)
            .into_iter()
            .filter_map(|d| {
                let Some(name) = dns_label(&d.hca.name) else {
                    refused.push(format!(
                        "HCA {:?} of {}: its name makes no DNS label",
                        d.hca.name, cfg.resource_name
                    ));
                    return None;
                };
                let hca = d.hca;
                let mut attributes = BTreeMap::new();
                common(&mut attributes, cfg, "per-hca");
                put_str(&mut attributes, "hca", &hca.name);
                put_str(&mut attributes, "deviceID", &d.id);
                if let Some(pci) = &hca.pci {
                    if let Some(root) = pci.path.first().filter(|r| r.starts_with("pci")) {
                        put_str(&mut attributes, PCIE_ROOT, root);
                    }
                    put_str(&mut attributes, PCI_BUS_ID, &pci.address);
                }
                // -1 ("the platform does not say") is left out: a constraint on it would
                // match HCAs that merely share the not-knowing.
                if let Some(n) = hca.numa_node().filter(|n| *n >= 0) {
                    put(&mut attributes, NUMA_NODE, Attr::Int(n));
                }
                put_str(&mut attributes, "linkLayer", &hca.link_layers().join(","));
                let states: Vec<String> = hca
                    .ports
                    .iter()
                    .filter_map(|p| p.state.as_ref().map(|s| s.text.clone()))
                    .collect();
                put_str(&mut attributes, "portState", &states.join(","));
                if let Some(rate) = hca.ports.iter().find_map(|p| p.rate.clone()) {
                    put_str(&mut attributes, "rate", &rate);
                }
                if let Some(fw) = &hca.fw_ver {
                    put_str(&mut attributes, "firmware", fw);
                }
                if let Some(guid) = &hca.node_guid {
                    put_str(&mut attributes, "nodeGUID", guid);
                }
                let up = a.grant.problem.is_none() && a.health.up_hcas.contains(&hca.name);
                let reason = match (&a.grant.problem, up) {
                    (Some(p), _) => p.clone(),
                    (None, true) => "ports up".to_string(),
                    (None, false) => port_reason(hca),
                };
                Some(DraDevice {
                    name,
                    resource: cfg.resource_name.clone(),
                    per_hca: true,
                    hcas: vec![hca.name.clone()],
                    ports: counted_ports(hca, a),
                    nodes: per_hca::nodes_of(&[hca], &a.grant)
                        .into_iter()
                        .cloned()
                        .collect(),
                    attributes,
                    healthy: up,
                    reason,
                })
            })
            .collect(),
    }
}

/// `mlx5_0:1` for each port of `hca` that counts under the grant's link layer.
fn counted_ports(hca: &crate::host::sysfs::Hca, a: &Assessment) -> Vec<String> {
    hca.ports
        .iter()
        .filter(|p| p.counts_for(a.grant.link.as_ref()))
        .map(|p| format!("{}:{}", hca.name, p.number))
        .collect()
}

/// Why an HCA counts as down: its ports, or its missing verbs node.
fn port_reason(hca: &crate::host::sysfs::Hca) -> String {
    if hca.verbs.is_empty() {
        return format!("{}: no uverbs device node", hca.name);
    }
    let ports: Vec<String> = hca.ports.iter().map(|p| p.summary()).collect();
    if ports.is_empty() {
        return format!("{}: no port is up", hca.name);
    }
    format!("{}: {}", hca.name, ports.join(", "))
}

fn common(attributes: &mut BTreeMap<String, Attr>, cfg: &Config, mode: &str) {
    put_str(attributes, "resource", &cfg.resource_name);
    put_str(attributes, "mode", mode);
}

/// A string attribute, left out when empty or longer than the API takes (the scheduler would
/// reject the whole slice).
fn put_str(attributes: &mut BTreeMap<String, Attr>, name: &str, value: &str) {
    // The API counts bytes, not characters.
    if value.is_empty() || value.len() > MAX_STRING_VALUE {
        log::debug!("attribute {name} left out: {} characters", value.len());
        return;
    }
    put(attributes, name, Attr::Str(value.to_string()));
}

fn put(attributes: &mut BTreeMap<String, Attr>, name: &str, value: Attr) {
    if attributes.len() >= MAX_ATTRIBUTES {
        return;
    }
    let id = name.rsplit('/').next().unwrap_or(name);
    if id.is_empty() || id.len() > MAX_ATTRIBUTE_NAME {
        return;
    }
    attributes.insert(name.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label("mlx5_0").as_deref(), Some("mlx5-0"));
        assert_eq!(dns_label("rdma-0").as_deref(), Some("rdma-0"));
        assert_eq!(dns_label("Bnxt_RE0").as_deref(), Some("bnxt-re0"));
        assert_eq!(dns_label("_x_").as_deref(), Some("x"));
        assert_eq!(dns_label("___"), None);
        assert_eq!(dns_label(""), None);
        let long = "a".repeat(70);
        assert_eq!(dns_label(&long).map(|s| s.len()), Some(63));
    }

    /// Two HCAs whose names make one label: neither is published (granting one could hand out
    /// the other), and both are named in the refusals.
    #[test]
    fn colliding_names_are_refused() {
        use crate::host::mock::{self, MockHca};
        let base = std::env::temp_dir().join(format!("rdma-dra-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let sys = base.join("sys");
        let dev = base.join("dev");
        let mut a = MockHca::connectx(0);
        a.name = "mlx5_0".into();
        let mut b = MockHca::connectx(1);
        b.name = "mlx5-0".into();
        let c = MockHca::connectx(2);
        for h in [&a, &b, &c] {
            mock::add_hca(&sys, Some(&dev), h).unwrap();
        }
        let cfg = Config {
            host_root: base.clone(),
            sysfs: sys.clone(),
            per_hca: true,
            ..Config::default()
        };
        let host = crate::host::scan(&base, &sys, cfg.selection()).unwrap();
        let mut monitor = crate::host::health::PortMonitor::new(cfg.hold_down);
        let a = crate::host::assess(
            std::sync::Arc::new(host),
            &cfg.selector,
            &cfg.taken,
            cfg.health,
            &mut monitor,
            std::time::Instant::now(),
        );
        let inv = inventory(&[(&cfg, &a)]);
        let names: Vec<&str> = inv.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["mlx5-2"]);
        assert_eq!(inv.refused.len(), 2, "{:?}", inv.refused);
        assert!(inv
            .refused
            .iter()
            .all(|r| r.contains("taken by another device")));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
