//! jarvice-rdma-plugin: a Kubernetes device plugin (API v1beta1) that passes the host's
//! InfiniBand/RDMA device nodes to pods. `main.rs` parses flags; the work lives here.

pub mod api;
pub mod config;
pub mod discovery;
pub mod lifecycle;
pub mod list;
pub mod plugin;
pub mod probe;
pub mod registration;
pub mod resource;
pub mod server;
pub mod stream;
pub mod sys;
pub mod wake;
pub mod watch;
pub mod workers;
