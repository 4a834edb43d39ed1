//! The DRA front-end (`--frontend dra`, cargo feature `dra`): the same host model and resource
//! specs served through Dynamic Resource Allocation (`resource.k8s.io/v1`) instead of the
//! device-plugin API.
//!
//! - [`devices`]: what each resource publishes, as DRA devices (names, attributes, health);
//! - [`slice`]: the node's ResourceSlice made of them, within the API's limits;
//! - [`publish`]: keeps the slice in the API server as the host is (and after the kubelet wipes it);
//! - [`claims`]: NodePrepareResources/NodeUnprepareResources: a CDI spec per claim;
//! - [`service`]: the kubelet-facing gRPC services (registration, DRAPlugin v1, health);
//! - [`daemon`]: the loop that drives them.

pub mod claims;
pub mod daemon;
pub mod devices;
pub mod diagnose;
pub mod list;
pub mod probe;
pub mod proto;
pub mod publish;
pub mod service;
pub mod slice;
