//! CSI SnapshotMetadata service: changed block tracking, streamed. Each call runs on the
//! blocking pool and hands its pages to the response stream through a short queue, so a
//! slow reader holds back the walk instead of growing memory.

use std::time::Instant;

use csi::snapshot_metadata_server::SnapshotMetadata;
use csi_proto as csi;
use strata_core::block_ranges::{RangePage, RangeQuery};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Services;
use super::status::to_status;

/// Pages queued between the walk and the response stream.
const QUEUED_PAGES: usize = 4;

pub struct SnapshotMetadataService(pub Services);

fn block_metadata(page: &RangePage) -> Vec<csi::BlockMetadata> {
    page.ranges
        .iter()
        .map(|r| csi::BlockMetadata {
            byte_offset: r.offset.min(i64::MAX as u64) as i64,
            size_bytes: r.length.min(i64::MAX as u64) as i64,
        })
        .collect()
}

impl SnapshotMetadataService {
    /// Checks the request, then walks on the blocking pool, each page turned into a
    /// message by `message`. A refusal before the first page is the call's status.
    async fn stream<T, M>(
        &self,
        method: &'static str,
        query: Result<RangeQuery, strata_core::Error>,
        message: M,
    ) -> Result<Response<ReceiverStream<Result<T, Status>>>, Status>
    where
        T: Send + 'static,
        M: Fn(RangePage) -> T + Send + 'static,
    {
        let query = query.map_err(to_status)?;
        let driver = self.0.driver.clone();
        let (tx, rx) = mpsc::channel(QUEUED_PAGES);
        let span = tracing::info_span!("rpc", method, snapshot_id = %query.target);
        let start = Instant::now();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let mut pages = 0u64;
            let mut ranges = 0u64;
            let result = driver.snapshot_metadata.answer(&query, &mut |page| {
                pages += 1;
                ranges += page.ranges.len() as u64;
                tx.blocking_send(Ok(message(page))).is_ok()
            });
            let micros = start.elapsed().as_micros() as u64;
            match result {
                Ok(()) => tracing::info!(method, micros, pages, ranges, code = "OK", "rpc"),
                Err(e) => {
                    let status = to_status(e);
                    tracing::warn!(method, micros, code = ?status.code(), message = status.message(), "rpc");
                    let _ = tx.blocking_send(Err(status));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream =
        ReceiverStream<Result<csi::GetMetadataAllocatedResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        let query = RangeQuery::new(None, &req.snapshot_id, req.starting_offset, req.max_results);
        self.stream("GetMetadataAllocated", query, |page| {
            csi::GetMetadataAllocatedResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: page.capacity_bytes.min(i64::MAX as u64) as i64,
                block_metadata: block_metadata(&page),
            }
        })
        .await
    }

    type GetMetadataDeltaStream = ReceiverStream<Result<csi::GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        let query = RangeQuery::new(
            Some(&req.base_snapshot_id),
            &req.target_snapshot_id,
            req.starting_offset,
            req.max_results,
        );
        self.stream("GetMetadataDelta", query, |page| {
            csi::GetMetadataDeltaResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: page.capacity_bytes.min(i64::MAX as u64) as i64,
                block_metadata: block_metadata(&page),
            }
        })
        .await
    }
}
