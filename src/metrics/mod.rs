//! Prometheus metrics on `--metrics-address` (feature `metrics`): [`server`] answers scrapes on
//! its own thread, [`render`] turns the [`crate::observe::Observer`]'s snapshot into the text
//! format. A scrape reads what the daemon last read; it never asks the main loop or a gRPC
//! thread for anything.

pub mod render;
pub mod server;

pub use server::spawn;
