//! The host model: what a node has, as pure functions of a `/dev` and a `/sys` tree. Nothing
//! here knows about gRPC or the kubelet, so any front-end (the device plugin today, a DRA
//! driver later) can serve it.

pub mod nodes;
