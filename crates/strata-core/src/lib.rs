//! Strata's domain core: volumes, backends, the metadata store and host access. Nothing here
//! knows about gRPC; the `strata` crate converts between CSI messages and these types.

pub mod backend;
pub mod block_ranges;
pub mod capability;
pub mod config;
pub mod controller;
pub mod driver;
pub mod durable;
pub mod encryption;
pub mod error;
pub mod fault;
pub mod filesystem;
pub mod freezer;
pub mod group;
pub mod host_error;
pub mod ids;
pub mod inflight;
pub mod io_limits;
pub mod model;
pub mod mounts;
pub mod moves;
pub mod node;
pub mod node_loss;
pub mod os;
pub mod paths;
pub mod peer;
pub mod pool_image;
pub mod reaper;
pub mod rekey;
#[cfg(test)]
mod rollback_tests;
pub mod snapshot;
pub mod snapshot_metadata;
pub mod store;
#[cfg(test)]
mod testing;
pub mod tree_stream;
pub mod validate;
pub mod volumes;

pub use driver::{Config, Driver};
pub use error::{Error, Result};
