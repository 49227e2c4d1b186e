//! The peer service's handlers: convert, call the core's exports off the async runtime,
//! convert back. Streams are fed through a queue of four chunks, so one stream holds at
//! most three chunks of memory here.

use std::sync::Arc;

use strata_core::Error;
use strata_core::block_ranges::RangeQuery;
use strata_core::model::ContentSource;
use strata_core::peer::{Exports, MoveStep, SourceInfo, format_to_wire};
use strata_peer_proto as proto;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::service::run;
use crate::service::status::to_status;

/// The largest request a peer may send (requests are ids and offsets).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Chunks queued per stream ahead of the network.
const QUEUED_CHUNKS: usize = 4;

pub struct PeerService {
    exports: Arc<Exports>,
}

impl PeerService {
    pub fn new(exports: Arc<Exports>) -> Self {
        PeerService { exports }
    }

    /// The tonic server of this service, with its request size bound.
    pub fn server(exports: Arc<Exports>) -> proto::peer_server::PeerServer<Self> {
        proto::peer_server::PeerServer::new(PeerService::new(exports))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The content source a request names.
pub(crate) fn source(kind: i32, id: String) -> Result<ContentSource, Error> {
    match proto::SourceKind::try_from(kind) {
        Ok(proto::SourceKind::Snapshot) => Ok(ContentSource::Snapshot(id)),
        Ok(proto::SourceKind::Volume) => Ok(ContentSource::Volume(id)),
        _ => Err(Error::InvalidArgument(format!(
            "source kind {kind} is neither a snapshot nor a volume"
        ))),
    }
}

fn info(source: SourceInfo) -> proto::Source {
    proto::Source {
        size_bytes: source.size_bytes,
        format: format_to_wire(&source.format),
        backend: source.backend,
        wrapped_key: source.encryption.map(|k| k.to_wire()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl proto::peer_server::Peer for PeerService {
    async fn lookup(
        &self,
        request: Request<proto::LookupRequest>,
    ) -> Result<Response<proto::LookupResponse>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let id = req.id.clone();
        run("peer.Lookup", &id, move || {
            let found = exports.lookup(&source(req.kind, req.id)?)?;
            Ok(proto::LookupResponse {
                found: found.is_some(),
                node_id: exports.node_id().to_owned(),
                source: found.map(info),
            })
        })
        .await
    }

    async fn open_read(
        &self,
        request: Request<proto::OpenReadRequest>,
    ) -> Result<Response<proto::OpenReadResponse>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let id = req.id.clone();
        run("peer.OpenRead", &id, move || {
            let reader = strata_core::validate::required_str("reader_node", &req.reader_node)?;
            let opened = exports.open(&source(req.kind, req.id.clone())?, reader)?;
            Ok(proto::OpenReadResponse {
                read_id: opened.read_id,
                source: Some(info(opened.source)),
                allocated_bytes: opened.allocated_bytes,
                idle_seconds: opened.idle.as_secs().min(u64::from(u32::MAX)) as u32,
            })
        })
        .await
    }

    type ReadExtentsStream = ReceiverStream<Result<proto::ExtentChunk, Status>>;

    async fn read_extents(
        &self,
        request: Request<proto::ReadExtentsRequest>,
    ) -> Result<Response<Self::ReadExtentsStream>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let span = tracing::info_span!("rpc", method = "peer.ReadExtents", read_id = %req.read_id);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let read = exports.read(&req.read_id, req.from_offset, &mut |chunk| {
                let data = proto::Data {
                    offset: chunk.offset,
                    bytes: chunk.bytes.to_vec().into(),
                    crc32: chunk.crc32,
                };
                tx.blocking_send(Ok(proto::ExtentChunk {
                    kind: Some(proto::extent_chunk::Kind::Data(data)),
                }))
                .is_ok()
            });
            let last = match read {
                Ok(end) => {
                    tracing::info!(
                        bytes = end.data_bytes,
                        chunks = end.chunks,
                        "peer stream sent"
                    );
                    Ok(proto::ExtentChunk {
                        kind: Some(proto::extent_chunk::Kind::End(proto::End {
                            data_bytes: end.data_bytes,
                            chunks: end.chunks,
                            size_bytes: end.size_bytes,
                        })),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "peer stream stopped");
                    Err(to_status(e))
                }
            };
            // The reader may be gone already; nothing is left to tell it.
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn modify_volume(
        &self,
        request: Request<proto::ModifyVolumeRequest>,
    ) -> Result<Response<proto::ModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let id = req.volume_id.clone();
        run("peer.ModifyVolume", &id, move || {
            let parameters = strata_core::validate::ordered(&req.parameters);
            exports.modify_volume(&req.volume_id, &parameters)?;
            Ok(proto::ModifyVolumeResponse {})
        })
        .await
    }

    type SnapshotRangesStream = ReceiverStream<Result<proto::SnapshotRangesMessage, Status>>;

    async fn snapshot_ranges(
        &self,
        request: Request<proto::SnapshotRangesRequest>,
    ) -> Result<Response<Self::SnapshotRangesStream>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let span = tracing::info_span!("rpc", method = "peer.SnapshotRanges", snapshot_id = %req.target_snapshot_id);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let base = Some(req.base_snapshot_id.as_str()).filter(|b| !b.is_empty());
            let query = RangeQuery::new(
                base,
                &req.target_snapshot_id,
                i64::try_from(req.starting_offset).unwrap_or(i64::MAX),
                i32::try_from(req.max_results).unwrap_or(i32::MAX),
            );
            let answered = query.and_then(|query| {
                exports.snapshot_ranges(&query, &mut |page| {
                    let page = proto::RangePage {
                        capacity_bytes: page.capacity_bytes,
                        ranges: page
                            .ranges
                            .iter()
                            .map(|r| proto::BlockRange {
                                offset: r.offset,
                                length: r.length,
                            })
                            .collect(),
                    };
                    tx.blocking_send(Ok(proto::SnapshotRangesMessage {
                        kind: Some(proto::snapshot_ranges_message::Kind::Page(page)),
                    }))
                    .is_ok()
                })
            });
            let last = match answered {
                Ok(()) => Ok(proto::SnapshotRangesMessage {
                    kind: Some(proto::snapshot_ranges_message::Kind::End(
                        proto::RangesEnd {},
                    )),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "peer snapshot ranges stopped");
                    Err(to_status(e))
                }
            };
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn move_out(
        &self,
        request: Request<proto::MoveOutRequest>,
    ) -> Result<Response<proto::MoveOutResponse>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        let id = req.volume_id.clone();
        run("peer.MoveOut", &id, move || {
            let target = strata_core::validate::required_str("target_node", &req.target_node)?;
            let step = match proto::MoveStep::try_from(req.step) {
                Ok(proto::MoveStep::Precopy) => MoveStep::Precopy,
                Ok(proto::MoveStep::Final) => MoveStep::Final,
                Ok(proto::MoveStep::Cancel) => MoveStep::Cancel,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "move step {} is not one this version knows",
                        req.step
                    )));
                }
            };
            let out = exports.move_out(step, &req.volume_id, &req.move_id, target)?;
            Ok(proto::MoveOutResponse {
                read: out.read.map(|r| proto::OpenReadResponse {
                    read_id: r.read_id,
                    source: Some(info(r.source)),
                    allocated_bytes: r.allocated_bytes,
                    idle_seconds: exports.limits().idle.as_secs().min(u64::from(u32::MAX)) as u32,
                }),
                record: match out.record {
                    Some(record) => strata_core::moves::record_to_wire(&record)?,
                    None => vec![],
                },
            })
        })
        .await
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let req = request.into_inner();
        let exports = self.exports.clone();
        run("peer.Release", "", move || {
            exports.release(&req.read_id);
            Ok(proto::ReleaseResponse {})
        })
        .await
    }
}
