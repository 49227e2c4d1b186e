//! gRPC handlers, one file per CSI service. Each handler validates and converts the request,
//! runs the core operation off the async runtime, and converts the result back.

pub mod controller;
pub mod convert;
pub mod group_controller;
pub mod identity;
pub mod node;
pub mod snapshot_metadata;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use strata_core::{Driver, Error};
use tonic::{Response, Status};

pub use controller::ControllerService;
pub use group_controller::GroupControllerService;
pub use identity::IdentityService;
pub use node::NodeService;
pub use snapshot_metadata::SnapshotMetadataService;

/// Runs blocking core work on the blocking pool and logs the call: method, volume id,
/// duration and status code. Every line logged inside the call carries the method and the
/// volume id (a span entered in the blocking task). Requests themselves are never logged, so
/// secrets stay out.
pub(crate) async fn run<T, F>(
    method: &'static str,
    volume: &str,
    work: F,
) -> Result<Response<T>, Status>
where
    T: Send + 'static,
    F: FnOnce() -> strata_core::Result<T> + Send + 'static,
{
    let start = Instant::now();
    let span = tracing::info_span!("rpc", method, volume_id = volume);
    let result = match tokio::task::spawn_blocking(move || span.in_scope(work)).await {
        Ok(r) => r,
        Err(e) => Err(Error::Internal(format!("{method} did not complete: {e}"))),
    };
    let micros = start.elapsed().as_micros() as u64;
    match result {
        Ok(v) => {
            tracing::info!(method, volume, micros, code = "OK", "rpc");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = status::to_status(e);
            tracing::warn!(method, volume, micros, code = ?status.code(), message = status.message(), "rpc");
            Err(status)
        }
    }
}

/// Shared state of the services.
#[derive(Clone)]
pub struct Services {
    pub driver: Arc<Driver>,
    pub version: &'static str,
}
