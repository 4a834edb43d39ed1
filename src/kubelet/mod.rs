//! What the kubelet sees: the v1beta1 `DevicePlugin` service, the server on our socket, the
//! ListAndWatch streams and the registration with `kubelet.sock`.

pub mod api;
pub mod registration;
pub mod server;
pub mod service;
pub mod stream;
