//! The daemon that drives the kubelet side: the main loop and the filesystem watches it wakes on.

pub mod lifecycle;
pub mod watch;
