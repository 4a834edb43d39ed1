//! The node's ResourceSlice: one pool named after the node, owned by the Node, holding every
//! device of [`devices::Inventory`], with the API's limits checked here rather than by a
//! rejection from the API server. Unhealthy devices stay in the slice with a `NoSchedule`
//! taint (KEP-5055): the scheduler keeps new claims off them, and they come back at once.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

use k8s_openapi::jiff::Timestamp;

use crate::dra::devices::{Attr, Inventory};

/// Now, to the second (the API's `Time` has no finer grain).
pub fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Devices in one slice when any of them has taints (128 without).
pub const MAX_DEVICES_TAINTED: usize = 64;
/// Slices of one pool: 1,024 devices, more than any node has HCAs (virtual functions included).
pub const MAX_SLICES: usize = 16;
/// The taint's key under our driver's domain: `rdma.jarvice.com/unhealthy`.
pub const TAINT_NAME: &str = "unhealthy";

/// What a slice is made of, besides the devices.
pub struct Pool<'a> {
    pub driver: &'a str,
    pub node: &'a str,
    /// The Node's UID, for the owner reference (the slice goes when the Node does).
    pub node_uid: Option<&'a str>,
    pub generation: i64,
}

/// The taint of an Unhealthy device: when it was first seen Unhealthy (kept across republishes,
/// so an unchanged taint does not look new) and the reason as a label value.
pub fn taint(driver: &str, reason: &str, since: Timestamp) -> DeviceTaint {
    DeviceTaint {
        key: format!("{driver}/{TAINT_NAME}"),
        value: Some(label_value(reason)),
        effect: "NoSchedule".to_string(),
        time_added: Some(Time(since)),
    }
}

/// A label value (`[A-Za-z0-9._-]`, at most 63, alphanumeric at both ends) that says the most
/// of `reason`: `mlx5_0: port 1 DOWN (Polling) InfiniBand` -> `mlx5_0-port-1-DOWN-Polling-InfiniBand`.
pub fn label_value(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let mut s: String = out
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(63)
        .collect();
    while s.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        s.pop();
    }
    if s.is_empty() {
        "unhealthy".to_string()
    } else {
        s
    }
}

/// The slices of the pool for `inv` (one per [`MAX_DEVICES_TAINTED`] devices, at least one so
/// the pool exists), taints from `tainted`. Devices beyond [`MAX_SLICES`] slices are left out
/// and named in the returned list.
pub fn build(
    pool: &Pool<'_>,
    inv: &Inventory,
    tainted: &BTreeMap<String, DeviceTaint>,
) -> (Vec<ResourceSlice>, Vec<String>) {
    let mut devices = Vec::new();
    let mut left_out = Vec::new();
    for d in &inv.devices {
        if devices.len() >= MAX_SLICES * MAX_DEVICES_TAINTED {
            left_out.push(d.name.clone());
            continue;
        }
        let attributes: BTreeMap<String, DeviceAttribute> = d
            .attributes
            .iter()
            .map(|(k, v)| {
                let a = match v {
                    Attr::Str(s) => DeviceAttribute {
                        string: Some(s.clone()),
                        ..DeviceAttribute::default()
                    },
                    Attr::Int(i) => DeviceAttribute {
                        int: Some(*i),
                        ..DeviceAttribute::default()
                    },
                };
                (k.clone(), a)
            })
            .collect();
        devices.push(Device {
            name: d.name.clone(),
            attributes: Some(attributes),
            taints: tainted.get(&d.name).map(|t| vec![t.clone()]),
            ..Device::default()
        });
    }
    // The lower limit always: a taint may come at any time, and a slice must not change shape
    // (or be refused) because a port went down.
    let mut chunks: Vec<Vec<Device>> = devices
        .chunks(MAX_DEVICES_TAINTED)
        .map(<[Device]>::to_vec)
        .collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let count = chunks.len() as i64;
    let owner = pool.node_uid.map(|uid| OwnerReference {
        api_version: "v1".to_string(),
        kind: "Node".to_string(),
        name: pool.node.to_string(),
        uid: uid.to_string(),
        controller: Some(true),
        ..OwnerReference::default()
    });
    let slices = chunks
        .into_iter()
        .map(|devices| ResourceSlice {
            metadata: ObjectMeta {
                // The helper's naming: `<node>-<driver>-` and a random suffix from the API
                // server.
                generate_name: Some(generate_name(pool.node, pool.driver)),
                owner_references: owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: pool.driver.to_string(),
                node_name: Some(pool.node.to_string()),
                pool: ResourcePool {
                    name: pool.node.to_string(),
                    generation: pool.generation,
                    resource_slice_count: count,
                },
                // None rather than empty: the API server drops an empty list (omitempty), and
                // the slice we compare with must be the one it stores.
                devices: (!devices.is_empty()).then_some(devices),
                ..ResourceSliceSpec::default()
            },
        })
        .collect();
    (slices, left_out)
}

/// `<node>-<driver>-`, cut so that the API server's 5 random characters still fit 253.
fn generate_name(node: &str, driver: &str) -> String {
    let mut s = format!("{node}-{driver}-");
    s.truncate(253 - 5);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values() {
        assert_eq!(
            label_value("mlx5_0: port 1 DOWN (Polling) InfiniBand"),
            "mlx5_0-port-1-DOWN-Polling-InfiniBand"
        );
        assert_eq!(label_value("::"), "unhealthy");
        assert!(label_value(&"x y ".repeat(40)).len() <= 63);
        assert!(label_value(&"x y ".repeat(40)).ends_with(|c: char| c.is_ascii_alphanumeric()));
    }
}
