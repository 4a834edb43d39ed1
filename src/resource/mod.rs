//! The resource model: what is advertised to the kubelet and what an allocation grants. Pure
//! functions of the discovered [`Inventory`]; the gRPC layer only converts errors to statuses.
//!
//! JARVICE gives jobs whole nodes, so by default one device stands for *all* HCAs of the node.
//! With `shares = N` there are N such devices, each granting every node, so N pods can share.

use std::collections::HashSet;
use std::fmt;

use crate::host::nodes::{natural_cmp_str, Inventory};
use crate::host::{Assessment, Grant, Host};
use crate::kubelet::api;

pub mod cdi;
pub mod per_hca;
pub mod topology;

pub use per_hca::PerHca;

/// The kubelet counts a device healthy only for this exact string (`manager.go`).
pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";
/// Device specs grant read and write; `m` (mknod) is never needed for existing nodes.
pub const PERMISSIONS: &str = "rw";
/// The drop-in resource's IDs are this prefix and the share index: `rdma-0`, `rdma-1`, ...
pub const ID_PREFIX: &str = "rdma-";
/// The kubelet sends one container per Allocate; a pod with more containers than this asking
/// for RDMA is not a workload but an attack on our memory.
pub const MAX_CONTAINERS: usize = 128;
/// IDs one container request may name (available, must-include or requested); the kubelet
/// never names more than we advertise (at most 4,096 shares).
pub const MAX_IDS: usize = 8192;
/// Device specs in one Allocate answer (containers x granted nodes): a bound on what any
/// request can make us build, about 2 MiB of answer.
pub const MAX_SPECS: usize = 16_384;

/// The advertised devices: `shares` of them, with IDs that depend on nothing but their index,
/// so they are the same after a plugin or kubelet restart (the original's random IDs made pods
/// fail admission with `UnexpectedAdmissionError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    prefix: String,
    ids: Vec<String>,
}

/// What one resource advertises: shared devices (each granting every selected HCA) or one
/// device per HCA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    Shared(Resource),
    PerHca(PerHca),
}

impl Devices {
    /// The full ListAndWatch list for one reading.
    pub fn device_list(&self, a: &Assessment) -> api::ListAndWatchResponse {
        match self {
            Devices::Shared(r) => r.device_list(a.health.healthy, &a.grant.nodes),
            Devices::PerHca(p) => p.device_list(&a.host, &a.grant, &a.health.up_hcas),
        }
    }

    /// Allocate against the host as read now.
    pub fn allocate(
        &self,
        req: &api::AllocateRequest,
        host: &Host,
        grant: &Grant,
    ) -> Result<api::AllocateResponse, RequestError> {
        match self {
            Devices::Shared(r) => r.allocate(req, &grant.nodes),
            Devices::PerHca(p) => p.allocate(req, host, grant),
        }
    }

    /// GetPreferredAllocation against the latest reading.
    pub fn preferred(
        &self,
        req: &api::PreferredAllocationRequest,
        a: &Assessment,
    ) -> Result<api::PreferredAllocationResponse, RequestError> {
        match self {
            Devices::Shared(r) => r.preferred(req),
            Devices::PerHca(p) => p.preferred(req, &a.host, &a.grant, &a.health.up_hcas),
        }
    }
}

impl Devices {
    /// The CDI devices of one reading: each advertised ID with the nodes it grants.
    pub fn cdi_devices<'a>(&self, host: &'a Host, grant: &'a Grant) -> Vec<cdi::CdiDevice<'a>> {
        let a = Pair { host, grant };
        match self {
            Devices::Shared(r) => r
                .ids()
                .iter()
                .map(|id| cdi::CdiDevice {
                    name: id.clone(),
                    nodes: a.grant.nodes.nodes.iter().collect(),
                    env: Vec::new(),
                })
                .collect(),
            Devices::PerHca(_) => per_hca::devices(a.host, a.grant)
                .into_iter()
                .map(|d| cdi::CdiDevice {
                    nodes: per_hca::nodes_of(&[d.hca], a.grant),
                    name: d.id,
                    // No env here: CDI env edits of several devices replace each other, so a
                    // pod with two HCAs would see one. Allocate's envs name them all.
                    env: Vec::new(),
                })
                .collect(),
        }
    }
}

struct Pair<'a> {
    host: &'a Host,
    grant: &'a Grant,
}

/// The ListAndWatch topology of a device on `numa` nodes (none when unknown).
pub fn topology_of(numa: &[i64]) -> Option<api::TopologyInfo> {
    if numa.is_empty() {
        return None;
    }
    let mut t = api::TopologyInfo::new();
    t.nodes = numa
        .iter()
        .map(|&id| {
            let mut n = api::NUMANode::new();
            n.ID = id;
            n
        })
        .collect();
    Some(t)
}

/// A request the plugin refuses: gRPC `UNAVAILABLE` for [`RequestError::NoVerbs`],
/// `INVALID_ARGUMENT` for the rest.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// No `uverbs*` node exists right now (driver unloaded, or the directory unreadable): a pod
    /// started anyway would silently run without RDMA, so admission had better fail.
    NoVerbs,
    NoContainers,
    NoDevices {
        container: usize,
    },
    UnknownId {
        container: usize,
        id: String,
        /// What we advertise, for the message (`rdma-0 .. rdma-3`).
        advertised: String,
    },
    /// Device discovery failed (an unreadable directory, too many open files): `UNAVAILABLE`
    /// with the cause, not "no driver".
    Discovery(String),
    /// Over a bound on what one request may ask for: `RESOURCE_EXHAUSTED`.
    TooLarge(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NoVerbs => write!(
                f,
                "no /dev/infiniband/uverbs* node on this node right now (RDMA driver not loaded?)"
            ),
            RequestError::NoContainers => write!(f, "request names no containers"),
            RequestError::Discovery(why) => {
                write!(f, "cannot discover the device nodes right now: {why}")
            }
            RequestError::TooLarge(why) => write!(f, "request too large: {why}"),
            RequestError::NoDevices { container } => {
                write!(f, "container request {container} names no device IDs")
            }
            RequestError::UnknownId {
                container,
                id,
                advertised,
            } => {
                // Bounded: a hostile request must not make us echo megabytes into the log.
                let shown: String = id.chars().take(128).collect();
                write!(
                    f,
                    "container request {container}: unknown device ID {shown:?} (this plugin advertises {advertised})"
                )
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// An Allocate request within the bounds, naming containers.
pub(crate) fn check_allocate(req: &api::AllocateRequest) -> Result<(), RequestError> {
    if req.container_requests.is_empty() {
        return Err(RequestError::NoContainers);
    }
    check_size(
        req.container_requests.len(),
        req.container_requests.iter().map(|c| c.devices_ids.len()),
    )
}

/// A GetPreferredAllocation request within the bounds, naming containers.
pub(crate) fn check_preferred(req: &api::PreferredAllocationRequest) -> Result<(), RequestError> {
    if req.container_requests.is_empty() {
        return Err(RequestError::NoContainers);
    }
    check_size(
        req.container_requests.len(),
        req.container_requests.iter().map(|c| {
            c.available_deviceIDs
                .len()
                .max(c.must_include_deviceIDs.len())
        }),
    )
}

/// How many IDs to pick: never more than the request offers (must-include and available), so
/// what it merely claims reserves nothing.
pub(crate) fn preferred_size(creq: &api::ContainerPreferredAllocationRequest) -> usize {
    let offered = creq.must_include_deviceIDs.len() + creq.available_deviceIDs.len();
    usize::try_from(creq.allocation_size)
        .unwrap_or(0)
        .min(offered)
}

/// Refuses requests over the bounds, before anything is built for them.
pub(crate) fn check_size<'a>(
    containers: usize,
    ids: impl Iterator<Item = usize> + 'a,
) -> Result<(), RequestError> {
    if containers > MAX_CONTAINERS {
        return Err(RequestError::TooLarge(format!(
            "{containers} container requests; at most {MAX_CONTAINERS} are served per call"
        )));
    }
    for (i, n) in ids.enumerate() {
        if n > MAX_IDS {
            return Err(RequestError::TooLarge(format!(
                "container request {i} names {n} device IDs; at most {MAX_IDS} are served"
            )));
        }
    }
    Ok(())
}

impl Resource {
    /// The drop-in's devices: `rdma-0` ... (`shares` at least 1, checked when flags are parsed).
    pub fn new(shares: u32) -> Resource {
        Resource::with_prefix(ID_PREFIX, shares)
    }

    /// Devices `<prefix>0` ...: another shared resource of the same process takes a prefix of
    /// its own, so IDs stay unique across resources.
    pub fn with_prefix(prefix: &str, shares: u32) -> Resource {
        Resource {
            prefix: prefix.to_string(),
            ids: (0..shares).map(|i| format!("{prefix}{i}")).collect(),
        }
    }

    fn advertised(&self) -> String {
        match self.ids.len() {
            1 => self.ids[0].clone(),
            n => format!("{} .. {}", self.ids[0], self.ids[n - 1]),
        }
    }

    /// The advertised IDs, `rdma-0` first.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// O(1): an Allocate may name thousands of IDs and we may advertise thousands of shares.
    fn is_known(&self, id: &str) -> bool {
        id.strip_prefix(self.prefix.as_str())
            .filter(|n| !n.starts_with('+') && (n.len() == 1 || !n.starts_with('0')))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < self.ids.len())
    }

    fn check_known<'a>(
        &self,
        container: usize,
        ids: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), RequestError> {
        for id in ids {
            if !self.is_known(id) {
                return Err(RequestError::UnknownId {
                    container,
                    id: id.clone(),
                    advertised: self.advertised(),
                });
            }
        }
        Ok(())
    }

    /// The full device list for ListAndWatch: every share, with the health the host model
    /// assessed and the NUMA nodes of the granted HCAs when sysfs tells them all.
    pub fn device_list(&self, healthy: bool, granted: &Inventory) -> api::ListAndWatchResponse {
        let health = if healthy { HEALTHY } else { UNHEALTHY };
        let topology = topology_of(&granted.numa_nodes());
        let mut resp = api::ListAndWatchResponse::new();
        resp.devices = self
            .ids
            .iter()
            .map(|id| {
                let mut d = api::Device::new();
                d.ID = id.clone();
                d.health = health.to_string();
                d.topology = topology.clone().into();
                d
            })
            .collect();
        resp
    }

    /// One answer per container request, each granting every discovered node (host path =
    /// container path, `rw`). Unknown or missing IDs refuse the whole request, and so does an
    /// inventory without a `uverbs*` node.
    pub fn allocate(
        &self,
        req: &api::AllocateRequest,
        inv: &Inventory,
    ) -> Result<api::AllocateResponse, RequestError> {
        check_allocate(req)?;
        for (i, creq) in req.container_requests.iter().enumerate() {
            if creq.devices_ids.is_empty() {
                return Err(RequestError::NoDevices { container: i });
            }
            self.check_known(i, &creq.devices_ids)?;
        }
        if !inv.has_verbs() {
            return Err(RequestError::NoVerbs);
        }
        let total = req.container_requests.len() * inv.nodes.len();
        if total > MAX_SPECS {
            return Err(RequestError::TooLarge(format!(
                "{} containers x {} device nodes = {total} device specs; at most {MAX_SPECS} per answer",
                req.container_requests.len(),
                inv.nodes.len()
            )));
        }
        let specs = device_specs(inv);
        let mut resp = api::AllocateResponse::new();
        resp.container_responses = req
            .container_requests
            .iter()
            .map(|_| {
                let mut cresp = api::ContainerAllocateResponse::new();
                cresp.devices = specs.clone();
                cresp
            })
            .collect();
        Ok(resp)
    }

    /// Picks `allocation_size` IDs per container: every `must_include` ID first, then available
    /// ones in natural order. The same request always gets the same answer. It is only a hint,
    /// so IDs we do not know are not refused here (the kubelet would fail admission on an error);
    /// Allocate checks them.
    pub fn preferred(
        &self,
        req: &api::PreferredAllocationRequest,
    ) -> Result<api::PreferredAllocationResponse, RequestError> {
        check_preferred(req)?;
        let mut resp = api::PreferredAllocationResponse::new();
        for creq in &req.container_requests {
            let size = preferred_size(creq);
            let mut chosen: Vec<String> = Vec::with_capacity(size);
            let mut seen = HashSet::new();
            let mut must = creq.must_include_deviceIDs.clone();
            must.sort_by(|a, b| natural_cmp_str(a, b));
            let mut available = creq.available_deviceIDs.clone();
            available.sort_by(|a, b| natural_cmp_str(a, b));
            for id in must {
                if seen.insert(id.clone()) {
                    chosen.push(id);
                }
            }
            for id in available {
                if chosen.len() >= size {
                    break;
                }
                if seen.insert(id.clone()) {
                    chosen.push(id);
                }
            }
            let mut cresp = api::ContainerPreferredAllocationResponse::new();
            cresp.deviceIDs = chosen;
            resp.container_responses.push(cresp);
        }
        Ok(resp)
    }
}

/// One spec per discovered node, in discovery order; discovery lists each path once, so there
/// are no duplicates (the original added `rdma_cm` twice).
pub fn device_specs(inv: &Inventory) -> Vec<api::DeviceSpec> {
    inv.nodes
        .iter()
        .map(|n| {
            let path = n.host_path.to_string_lossy().into_owned();
            let mut spec = api::DeviceSpec::new();
            spec.container_path = path.clone();
            spec.host_path = path;
            spec.permissions = PERMISSIONS.to_string();
            spec
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::nodes::{DeviceNode, Kind};
    use std::path::PathBuf;

    fn inv(paths: &[(Kind, &str, Option<i64>)]) -> Inventory {
        Inventory {
            nodes: paths
                .iter()
                .map(|&(kind, p, numa_node)| DeviceNode {
                    kind,
                    host_path: PathBuf::from(p),
                    numa_node,
                    hca: None,
                    dev: None,
                })
                .collect(),
            refused: Vec::new(),
        }
    }

    impl Resource {
        /// Health by the drop-in's rule, as the daemon assesses it in `nodes` mode.
        fn device_list_of(&self, inv: &Inventory) -> api::ListAndWatchResponse {
            self.device_list(inv.has_verbs(), inv)
        }
    }

    fn alloc_req(containers: &[&[&str]]) -> api::AllocateRequest {
        let mut req = api::AllocateRequest::new();
        for ids in containers {
            let mut c = api::ContainerAllocateRequest::new();
            c.devices_ids = ids.iter().map(|s| s.to_string()).collect();
            req.container_requests.push(c);
        }
        req
    }

    #[test]
    fn ids_are_stable_and_health_follows_uverbs() {
        assert_eq!(Resource::new(3).ids(), ["rdma-0", "rdma-1", "rdma-2"]);
        assert_eq!(Resource::new(3), Resource::new(3));
        let r = Resource::new(2);
        let list = r.device_list_of(&inv(&[(Kind::Uverbs, "/dev/infiniband/uverbs0", None)]));
        assert_eq!(list.devices.len(), 2);
        assert!(list.devices.iter().all(|d| d.health == HEALTHY));
        assert!(list.devices.iter().all(|d| d.topology.is_none()));
        let list = r.device_list_of(&inv(&[(Kind::RdmaCm, "/dev/infiniband/rdma_cm", None)]));
        assert!(list.devices.iter().all(|d| d.health == UNHEALTHY));
        let list = r.device_list_of(&Inventory::default());
        assert_eq!(list.devices[1].ID, "rdma-1");
        assert_eq!(list.devices[1].health, UNHEALTHY);
    }

    #[test]
    fn only_advertised_ids_are_known() {
        let r = Resource::new(11);
        for id in ["rdma-0", "rdma-7", "rdma-10"] {
            assert!(r.is_known(id), "{id}");
        }
        for id in [
            "rdma-11", "rdma-01", "rdma-+1", "rdma--1", "rdma-", "rdma", "RDMA-0", "x-0", "",
        ] {
            assert!(!r.is_known(id), "{id}");
        }
    }

    #[test]
    fn topology_lists_numa_nodes() {
        let r = Resource::new(1);
        let list = r.device_list_of(&inv(&[
            (Kind::Uverbs, "/dev/infiniband/uverbs0", Some(1)),
            (Kind::Uverbs, "/dev/infiniband/uverbs1", Some(0)),
        ]));
        let nodes: Vec<i64> = list.devices[0]
            .topology
            .nodes
            .iter()
            .map(|n| n.ID)
            .collect();
        assert_eq!(nodes, vec![0, 1]);
    }

    #[test]
    fn allocate_grants_every_node_per_container() {
        let r = Resource::new(2);
        let i = inv(&[
            (Kind::Uverbs, "/dev/infiniband/uverbs0", None),
            (Kind::Uverbs, "/dev/infiniband/uverbs1", None),
            (Kind::RdmaCm, "/dev/infiniband/rdma_cm", None),
            (Kind::Knem, "/dev/knem", None),
        ]);
        let resp = r
            .allocate(&alloc_req(&[&["rdma-0"], &["rdma-1"]]), &i)
            .unwrap();
        assert_eq!(resp.container_responses.len(), 2);
        for c in &resp.container_responses {
            let paths: Vec<&str> = c.devices.iter().map(|d| d.host_path.as_str()).collect();
            assert_eq!(
                paths,
                [
                    "/dev/infiniband/uverbs0",
                    "/dev/infiniband/uverbs1",
                    "/dev/infiniband/rdma_cm",
                    "/dev/knem"
                ]
            );
            assert!(c.devices.iter().all(|d| d.container_path == d.host_path));
            assert!(c.devices.iter().all(|d| d.permissions == "rw"));
            assert!(c.envs.is_empty() && c.mounts.is_empty());
        }
    }

    #[test]
    fn allocate_refuses_bad_requests() {
        let r = Resource::new(1);
        let i = Inventory::default();
        assert_eq!(
            r.allocate(&alloc_req(&[]), &i).unwrap_err(),
            RequestError::NoContainers
        );
        assert_eq!(
            r.allocate(&alloc_req(&[&[]]), &i).unwrap_err(),
            RequestError::NoDevices { container: 0 }
        );
        let err = r
            .allocate(&alloc_req(&[&["rdma-0"], &["rdma-0", "gpu-7"]]), &i)
            .unwrap_err();
        // Valid IDs, but no uverbs node: refused as unavailable, not granted empty.
        assert_eq!(
            r.allocate(&alloc_req(&[&["rdma-0"]]), &i).unwrap_err(),
            RequestError::NoVerbs
        );
        let cm_only = inv(&[(Kind::RdmaCm, "/dev/infiniband/rdma_cm", None)]);
        assert_eq!(
            r.allocate(&alloc_req(&[&["rdma-0"]]), &cm_only)
                .unwrap_err(),
            RequestError::NoVerbs
        );
        assert_eq!(
            err,
            RequestError::UnknownId {
                container: 1,
                id: "gpu-7".into(),
                advertised: "rdma-0".into()
            }
        );
        assert!(err
            .to_string()
            .contains("\"gpu-7\" (this plugin advertises rdma-0)"));
    }

    fn pref_req(available: &[&str], must: &[&str], size: i32) -> api::PreferredAllocationRequest {
        let mut c = api::ContainerPreferredAllocationRequest::new();
        c.available_deviceIDs = available.iter().map(|s| s.to_string()).collect();
        c.must_include_deviceIDs = must.iter().map(|s| s.to_string()).collect();
        c.allocation_size = size;
        let mut req = api::PreferredAllocationRequest::new();
        req.container_requests.push(c);
        req
    }

    #[test]
    fn preferred_honours_must_include_and_size() {
        let r = Resource::new(12);
        let pick = |a: &[&str], m: &[&str], n| {
            r.preferred(&pref_req(a, m, n)).unwrap().container_responses[0]
                .deviceIDs
                .clone()
        };
        assert_eq!(
            pick(&["rdma-10", "rdma-2", "rdma-3"], &[], 2),
            ["rdma-2", "rdma-3"]
        );
        assert_eq!(
            pick(&["rdma-10", "rdma-2", "rdma-3"], &["rdma-10"], 2),
            ["rdma-10", "rdma-2"]
        );
        assert_eq!(
            pick(&["rdma-1"], &["rdma-4", "rdma-0"], 1),
            ["rdma-0", "rdma-4"]
        );
        assert_eq!(pick(&["rdma-1", "rdma-1"], &[], 3), ["rdma-1"]);
        // A hint: unknown IDs pass through (Allocate refuses them), nothing errors.
        assert_eq!(pick(&["nope", "rdma-0"], &[], 2), ["nope", "rdma-0"]);
        assert!(r
            .preferred(&api::PreferredAllocationRequest::new())
            .is_err());
    }
}
