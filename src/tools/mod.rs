//! Operator subcommands: `list` (what this node would advertise) and `probe` (check a running
//! plugin the way the kubelet does).

pub mod list;
pub mod probe;
