//! The daemon that drives the kubelet side: the main loop, the readings of the host it serves,
//! and the filesystem watches it wakes on.

pub mod lifecycle;
pub mod reading;
pub mod watch;
