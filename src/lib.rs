//! jarvice-rdma-plugin: a Kubernetes device plugin (API v1beta1) that passes the host's
//! InfiniBand/RDMA device nodes to pods. `main.rs` parses flags; the work lives here:
//!
//! - [`host`]: the host model (device nodes), pure functions of a `/dev` and a `/sys` tree;
//! - [`resource`]: turns the host model into the devices a resource advertises and grants;
//! - [`kubelet`]: the gRPC service, server, streams and registration the kubelet talks to;
//! - [`daemon`]: the main loop that serves, registers and reacts to events;
//! - [`tools`]: the operator subcommands;
//! - [`observe`]: what the daemon tells operators (counters, its latest view of the host), which
//!   [`metrics`] serves to Prometheus and [`events`] posts as Kubernetes Events;
//! - [`kube`]: the API server client (the DRA front-end and Events);
//! - [`config`] (flags), [`limits`] (memlock, open files) and the OS glue: [`sys`], [`wake`],
//!   [`workers`].

pub mod config;
pub mod daemon;
#[cfg(feature = "dra")]
pub mod dra;
#[cfg(feature = "dra")]
pub mod events;
pub mod host;
#[cfg(feature = "dra")]
pub mod kube;
pub mod kubelet;
pub mod limits;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod observe;
pub mod resource;
pub mod sys;
pub mod tools;
pub mod wake;
pub mod workers;
