//! The `strata` binary's pieces, as a library so the integration tests drive the same client
//! and server code the binary runs.

pub mod bench;
pub mod certs;
pub mod client;
pub mod decode_errors;
pub mod endpoint;
pub mod http;
#[cfg(feature = "kubernetes")]
pub(crate) mod kube_api;
#[cfg(feature = "kubernetes")]
pub mod kube_cluster;
#[cfg(feature = "kubernetes")]
pub mod kube_moves;
#[cfg(feature = "kubernetes")]
pub mod kube_node_loss;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod service;
pub mod transport;
pub mod units;
