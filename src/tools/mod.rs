//! Operator subcommands: `list` (what this node would advertise, HCA by HCA), `probe` (check a
//! running plugin the way the kubelet does) and `diagnose` (why RDMA pods fail here).

pub mod diagnose;
pub mod json;
pub mod list;
pub mod probe;
