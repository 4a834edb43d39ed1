//! Per-HCA devices: one device per selected HCA, with a stable ID ([`host::hca_id`]), the health
//! of its own ports and its own NUMA node. Allocate grants the HCAs of the requested IDs: their
//! `uverbs` (and `umad`/`issm` with `--mad-devices`) nodes, plus `rdma_cm` and `knem`, and tells
//! the container which HCAs it got.

use std::collections::HashMap;

use crate::host::nodes::{DeviceNode, Inventory, Kind};
use crate::host::sysfs::Hca;
use crate::host::{self, Grant, Host};
use crate::kubelet::api;
use crate::resource::topology::{self, Place};
use crate::resource::{
    check_allocate, check_preferred, device_specs, preferred_size, topology_of, RequestError,
    HEALTHY, MAX_SPECS, UNHEALTHY,
};

/// The env that names the granted HCAs, comma-separated (`mlx5_0,mlx5_3`).
pub const HCAS_ENV: &str = "JARVICE_RDMA_HCAS";

/// One advertised per-HCA device.
pub struct HcaDevice<'a> {
    pub id: String,
    pub hca: &'a Hca,
}

/// The devices of `grant` on `host`, in HCA order, with the IDs [`host::hca_ids`] gives over the
/// whole host (so no two resources of the process advertise one ID).
pub fn devices<'a>(host: &'a Host, grant: &Grant) -> Vec<HcaDevice<'a>> {
    let ids = host::hca_ids(&host.hcas);
    grant
        .hcas
        .iter()
        .filter_map(|name| {
            let hca = host.hcas.get(name)?;
            Some(HcaDevice {
                id: ids.get(name)?.clone(),
                hca,
            })
        })
        .collect()
}

/// What per-HCA devices of `hcas` grant: their `uverbs` (and `umad`/`issm`) nodes, then
/// `rdma_cm` and `knem`, in discovery order.
pub fn nodes_of<'a>(hcas: &[&Hca], grant: &'a Grant) -> Vec<&'a DeviceNode> {
    let mut nodes: Vec<&DeviceNode> = grant
        .nodes
        .nodes
        .iter()
        .filter(|n| match n.kind {
            Kind::RdmaCm | Kind::Knem => true,
            _ => n
                .hca
                .as_ref()
                .is_some_and(|h| hcas.iter().any(|x| &x.name == h)),
        })
        .collect();
    nodes.sort_by_key(|n| n.kind);
    nodes
}

/// Per-HCA allocation options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerHca {
    /// Also set `NCCL_IB_HCA` and `UCX_NET_DEVICES` in the container.
    pub hca_envs: bool,
}

impl PerHca {
    /// Every device, Healthy while its HCA is up, with its HCA's NUMA node.
    pub fn device_list(
        &self,
        host: &Host,
        grant: &Grant,
        up_hcas: &[String],
    ) -> api::ListAndWatchResponse {
        let mut resp = api::ListAndWatchResponse::new();
        resp.devices = devices(host, grant)
            .iter()
            .map(|d| {
                let mut dev = api::Device::new();
                dev.ID = d.id.clone();
                let up = grant.problem.is_none() && up_hcas.contains(&d.hca.name);
                dev.health = if up { HEALTHY } else { UNHEALTHY }.to_string();
                dev.topology =
                    topology_of(&d.hca.numa_node().into_iter().collect::<Vec<_>>()).into();
                dev
            })
            .collect();
        resp
    }

    /// Grants each container the HCAs its IDs name.
    pub fn allocate(
        &self,
        req: &api::AllocateRequest,
        host: &Host,
        grant: &Grant,
    ) -> Result<api::AllocateResponse, RequestError> {
        check_allocate(req)?;
        let devs = devices(host, grant);
        let by_id: HashMap<&str, &HcaDevice<'_>> =
            devs.iter().map(|d| (d.id.as_str(), d)).collect();
        let advertised = match devs.first() {
            None => "no device right now".to_string(),
            Some(d) => format!("{} per-HCA device(s), such as {}", devs.len(), d.id),
        };
        let mut resp = api::AllocateResponse::new();
        let mut total = 0;
        for (i, creq) in req.container_requests.iter().enumerate() {
            if creq.devices_ids.is_empty() {
                return Err(RequestError::NoDevices { container: i });
            }
            let mut hcas: Vec<&Hca> = Vec::new();
            for id in &creq.devices_ids {
                let Some(d) = by_id.get(id.as_str()) else {
                    return Err(RequestError::UnknownId {
                        container: i,
                        id: id.clone(),
                        advertised: advertised.clone(),
                    });
                };
                if !hcas.iter().any(|h| h.name == d.hca.name) {
                    hcas.push(d.hca);
                }
            }
            hcas.sort_by(|a, b| crate::host::nodes::natural_cmp_str(&a.name, &b.name));
            let nodes: Vec<DeviceNode> = nodes_of(&hcas, grant).into_iter().cloned().collect();
            if !nodes.iter().any(|n| n.kind == Kind::Uverbs) {
                let names: Vec<&str> = hcas.iter().map(|h| h.name.as_str()).collect();
                return Err(RequestError::Discovery(format!(
                    "no uverbs node for {} right now",
                    names.join(", ")
                )));
            }
            total += nodes.len();
            if total > MAX_SPECS {
                return Err(RequestError::TooLarge(format!(
                    "more than {MAX_SPECS} device specs in one answer"
                )));
            }
            let mut cresp = api::ContainerAllocateResponse::new();
            cresp.devices = device_specs(&Inventory {
                nodes,
                refused: Vec::new(),
            });
            let names: Vec<&str> = hcas.iter().map(|h| h.name.as_str()).collect();
            cresp.envs.insert(HCAS_ENV.to_string(), names.join(","));
            if self.hca_envs {
                // `=`: exact names, not prefixes (NCCL would take mlx5_1 for mlx5_10 too).
                cresp
                    .envs
                    .insert("NCCL_IB_HCA".to_string(), format!("={}", names.join(",")));
                let ports: Vec<String> = hcas
                    .iter()
                    .flat_map(|h| {
                        h.ports
                            .iter()
                            .filter(|p| p.counts_for(grant.link.as_ref()))
                            .map(move |p| format!("{}:{}", h.name, p.number))
                    })
                    .collect();
                cresp
                    .envs
                    .insert("UCX_NET_DEVICES".to_string(), ports.join(","));
            }
            resp.container_responses.push(cresp);
        }
        Ok(resp)
    }

    /// Topology-aware: see [`topology::choose`].
    pub fn preferred(
        &self,
        req: &api::PreferredAllocationRequest,
        host: &Host,
        grant: &Grant,
        up_hcas: &[String],
    ) -> Result<api::PreferredAllocationResponse, RequestError> {
        check_preferred(req)?;
        let devs = devices(host, grant);
        let places: HashMap<&str, Place> = devs
            .iter()
            .map(|d| {
                (
                    d.id.as_str(),
                    Place {
                        numa: d.hca.numa_node(),
                        path: d
                            .hca
                            .pci
                            .as_ref()
                            .map(|p| p.path.clone())
                            .unwrap_or_default(),
                        healthy: up_hcas.contains(&d.hca.name),
                    },
                )
            })
            .collect();
        let mut resp = api::PreferredAllocationResponse::new();
        for creq in &req.container_requests {
            let size = preferred_size(creq);
            let mut cresp = api::ContainerPreferredAllocationResponse::new();
            cresp.deviceIDs = topology::choose(
                &creq.must_include_deviceIDs,
                &creq.available_deviceIDs,
                size,
                |id| places.get(id).cloned(),
            );
            resp.container_responses.push(cresp);
        }
        Ok(resp)
    }
}
