//! jarvice-rdma-plugin: a Kubernetes device plugin (API v1beta1) that passes the host's
//! InfiniBand/RDMA device nodes to pods. `main.rs` parses flags; the work lives here:
//!
//! - [`host`]: the host model (device nodes), pure functions of a `/dev` and a `/sys` tree;
//! - [`resource`]: turns the host model into the devices a resource advertises and grants;
//! - [`kubelet`]: the gRPC service, server, streams and registration the kubelet talks to;
//! - [`daemon`]: the main loop that serves, registers and reacts to events;
//! - [`tools`]: the operator subcommands;
//! - [`config`] (flags), [`limits`] (memlock, open files) and the OS glue: [`sys`], [`wake`],
//!   [`workers`].

pub mod config;
pub mod daemon;
#[cfg(feature = "dra")]
pub mod dra;
pub mod host;
pub mod kubelet;
pub mod limits;
pub mod resource;
pub mod sys;
pub mod tools;
pub mod wake;
pub mod workers;
