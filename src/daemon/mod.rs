//! The daemon that drives the kubelet side: the main loop over a set of resources ([`unit`]),
//! the one reading of the host they share ([`snapshot`]), what each makes of it ([`reading`]), the CDI spec each keeps, and the filesystem watches
//! the loop wakes on.

pub mod cdi_spec;
pub mod grpc;
pub mod lifecycle;
pub mod reading;
pub mod snapshot;
pub mod unit;
pub mod watch;
