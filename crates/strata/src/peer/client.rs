//! The other nodes as the core sees them ([`Peers`]): gRPC over mutual TLS, one lazily
//! connected channel per node, every call bounded in time. Called from the core's blocking
//! threads, so each call blocks on the runtime it was built in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_core::Error;
use strata_core::block_ranges::{BlockRange, PageSink, RangePage, RangeQuery};
use strata_core::encryption::WrappedKey;
use strata_core::model::ContentSource;
use strata_core::peer::{
    Chunk, Cluster, MoveOut, MoveStep, Peers, ReadEnd, RemoteRead, SourceInfo, format_from_wire,
};
use strata_peer_proto as proto;
use tokio::runtime::Handle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::tls::PeerTls;

/// The largest message a peer may send: a chunk of data and its framing.
pub const MAX_MESSAGE_BYTES: usize = (1 << 20) + 64 * 1024;

/// HTTP/2 receive windows: per stream, and for all of a connection's streams.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// How long a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the peer's answer is turned into the core's terms: an unreachable peer is
/// UNAVAILABLE (the caller retries); an answer keeps its code, with the node named.
pub fn from_status(node: &str, status: &Status) -> Error {
    let said: String = status.message().chars().take(512).collect();
    let msg = format!("node {node}: {said}");
    match status.code() {
        Code::NotFound => Error::NotFound(msg),
        Code::InvalidArgument => Error::Internal(format!(
            "{msg} (a request this version made was refused: run the same Strata version on every node)"
        )),
        Code::FailedPrecondition => Error::FailedPrecondition(msg),
        Code::Aborted => Error::Aborted(msg),
        Code::ResourceExhausted => Error::Unavailable(format!("{msg}; retry later")),
        Code::OutOfRange => Error::OutOfRange(msg),
        Code::Unimplemented => Error::Unimplemented(msg),
        Code::Internal | Code::DataLoss => Error::Internal(msg),
        // Unavailable, DeadlineExceeded, Cancelled, Unknown (transport and TLS failures),
        // Unauthenticated, PermissionDenied, AlreadyExists: the node cannot be used now.
        _ => Error::Unavailable(format!(
            "node {node} cannot be reached ({:?}: {said})",
            status.code()
        )),
    }
}

/// Where the other nodes' peer services are.
pub enum Directory {
    /// Given on the command line (`--peer NODE=HOST:PORT`).
    Static(BTreeMap<String, String>),
    /// Read from the cluster at each use (the peer Service's EndpointSlices).
    Cluster(Arc<dyn Cluster>),
}

/// The other nodes, reached through the [`Directory`].
pub struct GrpcPeers {
    this_node: String,
    directory: Directory,
    tls: PeerTls,
    /// The TLS of bulk reads (`None`: they go over `ReadExtents`).
    bulk: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    runtime: Handle,
    channels: Mutex<HashMap<String, Channel>>,
}

impl GrpcPeers {
    pub fn new(
        this_node: &str,
        directory: Directory,
        tls: PeerTls,
        timeout: Duration,
        runtime: Handle,
    ) -> Self {
        let bulk = match tls.rustls_client(&[super::bulk::ALPN]) {
            Ok(config) => Some(config),
            Err(e) => {
                tracing::warn!(error = %e, "bulk reads are off; copies use ReadExtents");
                None
            }
        };
        GrpcPeers {
            this_node: this_node.to_owned(),
            directory,
            tls,
            bulk,
            timeout,
            runtime,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn address(&self, node: &str) -> Result<String, Error> {
        let found = match &self.directory {
            Directory::Static(map) => map.get(node).cloned(),
            Directory::Cluster(cluster) => cluster.peer_endpoints()?.remove(node),
        };
        found.ok_or_else(|| match &self.directory {
            Directory::Static(_) => Error::Unavailable(format!(
                "no peer address is known for node {node}: give --peer {node}=HOST:PORT"
            )),
            Directory::Cluster(_) => Error::Unavailable(format!(
                "node {node} has no ready endpoint of the peer Service (its Strata is not running or not ready)"
            )),
        })
    }

    fn client(&self, node: &str) -> Result<proto::peer_client::PeerClient<Channel>, Error> {
        let address = self.address(node)?;
        let key = format!("{node}={address}");
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("https://{address}"))
                    .and_then(|e| e.tls_config(self.tls.client()))
                    .map_err(|e| Error::Unavailable(format!("peer address of node {node}: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    // Room for a few chunks in flight: HTTP/2's default 64 KiB window would
                    // stall a stream every 64 KiB for a round trip.
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .timeout(self.timeout)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(self.timeout)
                    .keep_alive_while_idle(true);
                // Inside the runtime: the lazy channel spawns its connection task there.
                let _entered = self.runtime.enter();
                let channel = endpoint.connect_lazy();
                // A node's address changes when its pod is replaced: old channels go.
                channels.retain(|k, _| !k.starts_with(&format!("{node}=")));
                channels.insert(key, channel.clone());
                channel
            }
        };
        Ok(proto::peer_client::PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(super::service::MAX_REQUEST_BYTES))
    }

    fn kind(source: &ContentSource) -> (i32, String) {
        match source {
            ContentSource::Snapshot(id) => (proto::SourceKind::Snapshot as i32, id.clone()),
            ContentSource::Volume(id) => (proto::SourceKind::Volume as i32, id.clone()),
        }
    }

    fn source(node: &str, source: Option<proto::Source>) -> Result<SourceInfo, Error> {
        let s = source.ok_or_else(|| {
            Error::Internal(format!(
                "node {node} answered without describing the source"
            ))
        })?;
        Ok(SourceInfo {
            size_bytes: s.size_bytes,
            format: format_from_wire(&s.format)?,
            backend: s.backend.chars().take(32).collect(),
            encryption: match s.wrapped_key.as_str() {
                "" => None,
                wire => Some(WrappedKey::from_wire(wire).map_err(|_| {
                    Error::Internal(format!("node {node} sent a malformed wrapped key"))
                })?),
            },
        })
    }
}

impl Peers for GrpcPeers {
    fn nodes(&self) -> Result<Vec<String>, Error> {
        Ok(match &self.directory {
            Directory::Static(map) => map.keys().cloned().collect(),
            Directory::Cluster(cluster) => cluster.peer_endpoints()?.into_keys().collect(),
        })
    }

    fn cluster_nodes(&self) -> Result<Option<Vec<String>>, Error> {
        match &self.directory {
            Directory::Static(_) => Ok(None),
            Directory::Cluster(cluster) => cluster.node_names(),
        }
    }

    fn holder(&self, source: &ContentSource) -> Result<Option<String>, Error> {
        match (&self.directory, source) {
            (Directory::Static(_), _) => Ok(None),
            (Directory::Cluster(c), ContentSource::Volume(id)) => c.volume_node(id),
            (Directory::Cluster(c), ContentSource::Snapshot(id)) => c.snapshot_node(id),
        }
    }

    fn lookup(&self, node: &str, source: &ContentSource) -> Result<Option<SourceInfo>, Error> {
        let mut client = self.client(node)?;
        let (kind, id) = Self::kind(source);
        let answer = self
            .runtime
            .block_on(client.lookup(proto::LookupRequest { kind, id }))
            .map_err(|s| from_status(node, &s))?
            .into_inner();
        if !answer.found {
            return Ok(None);
        }
        if answer.node_id != node {
            return Err(Error::Unavailable(format!(
                "the peer address given for node {node} is served by node {:?}: fix --peer",
                answer.node_id.chars().take(256).collect::<String>()
            )));
        }
        Self::source(node, answer.source).map(Some)
    }

    fn open_read(&self, node: &str, source: &ContentSource) -> Result<RemoteRead, Error> {
        let mut client = self.client(node)?;
        let (kind, id) = Self::kind(source);
        let opened = self
            .runtime
            .block_on(client.open_read(proto::OpenReadRequest {
                kind,
                id,
                reader_node: self.this_node.clone(),
            }))
            .map_err(|s| from_status(node, &s))?
            .into_inner();
        Ok(RemoteRead {
            read_id: opened.read_id.chars().take(128).collect(),
            source: Self::source(node, opened.source)?,
            allocated_bytes: opened.allocated_bytes,
        })
    }

    fn read(
        &self,
        node: &str,
        read_id: &str,
        from: u64,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<(), Error>,
    ) -> Result<ReadEnd, Error> {
        if let Some(config) = &self.bulk {
            let request = super::bulk::Request {
                read_id: read_id.to_owned(),
                from,
            };
            let address = self.address(node)?;
            match super::bulk::read(
                config,
                node,
                &address,
                &request,
                self.timeout,
                CONNECT_TIMEOUT,
                sink,
            ) {
                Ok(end) => return Ok(end),
                Err(super::bulk::Failed::Read(e)) => return Err(e),
                // An older node, or none there: ReadExtents says which.
                Err(super::bulk::Failed::NotConnected(why)) => {
                    tracing::debug!(node, why, "no bulk read; streaming with ReadExtents");
                }
            }
        }
        let mut client = self.client(node)?;
        let timeout = self.timeout;
        self.runtime.block_on(async {
            let mut stream = client
                .read_extents(proto::ReadExtentsRequest {
                    read_id: read_id.to_owned(),
                    from_offset: from,
                })
                .await
                .map_err(|s| from_status(node, &s))?
                .into_inner();
            loop {
                let message = tokio::time::timeout(timeout, stream.message())
                    .await
                    .map_err(|_| {
                        Error::Unavailable(format!(
                            "node {node} sent nothing for {} s",
                            timeout.as_secs()
                        ))
                    })?
                    .map_err(|s| from_status(node, &s))?;
                match message.and_then(|m| m.kind) {
                    Some(proto::extent_chunk::Kind::Data(d)) => sink(Chunk {
                        offset: d.offset,
                        bytes: &d.bytes,
                        crc32: d.crc32,
                    })?,
                    Some(proto::extent_chunk::Kind::End(e)) => {
                        return Ok(ReadEnd {
                            data_bytes: e.data_bytes,
                            chunks: e.chunks,
                            size_bytes: e.size_bytes,
                        });
                    }
                    None => {
                        return Err(Error::Unavailable(format!(
                            "the stream from node {node} ended before its end"
                        )));
                    }
                }
            }
        })
    }

    fn move_out(
        &self,
        node: &str,
        step: MoveStep,
        volume_id: &str,
        move_id: &str,
    ) -> Result<MoveOut, Error> {
        let mut client = self.client(node)?;
        let wire = match step {
            MoveStep::Precopy => proto::MoveStep::Precopy,
            MoveStep::Final => proto::MoveStep::Final,
            MoveStep::Cancel => proto::MoveStep::Cancel,
        };
        let answer = self
            .runtime
            .block_on(client.move_out(proto::MoveOutRequest {
                volume_id: volume_id.to_owned(),
                move_id: move_id.to_owned(),
                step: wire as i32,
                target_node: self.this_node.clone(),
            }))
            .map_err(|s| from_status(node, &s))?
            .into_inner();
        let read = match answer.read {
            Some(opened) => Some(RemoteRead {
                read_id: opened.read_id.chars().take(128).collect(),
                source: Self::source(node, opened.source)?,
                allocated_bytes: opened.allocated_bytes,
            }),
            None => None,
        };
        let record = match answer.record.is_empty() {
            true => None,
            false => Some(strata_core::moves::record_from_wire(
                &answer.record,
                volume_id,
            )?),
        };
        Ok(MoveOut { read, record })
    }

    fn volume_holder(
        &self,
        volume_id: &str,
        pv_name: Option<&str>,
    ) -> Result<Option<String>, Error> {
        match &self.directory {
            Directory::Static(_) => Ok(None),
            Directory::Cluster(c) => match pv_name {
                Some(pv) => c.named_volume_node(pv, volume_id),
                None => c.volume_node(volume_id),
            },
        }
    }

    fn modify_volume(
        &self,
        node: &str,
        volume_id: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let mut client = self.client(node)?;
        self.runtime
            .block_on(client.modify_volume(proto::ModifyVolumeRequest {
                volume_id: volume_id.to_owned(),
                parameters: parameters.clone().into_iter().collect(),
            }))
            .map_err(|s| match s.code() {
                // Checked here already: the volume's node cannot apply these (another
                // backend there), which the resizer must see as infeasible.
                Code::InvalidArgument => Error::InvalidArgument(format!(
                    "node {node}: {}",
                    s.message().chars().take(512).collect::<String>()
                )),
                _ => from_status(node, &s),
            })?;
        Ok(())
    }

    fn snapshot_ranges(
        &self,
        node: &str,
        query: &RangeQuery,
        sink: &mut PageSink<'_>,
    ) -> Result<(), Error> {
        let mut client = self.client(node)?;
        let timeout = self.timeout;
        let request = proto::SnapshotRangesRequest {
            target_snapshot_id: query.target.clone(),
            base_snapshot_id: query.base.clone().unwrap_or_default(),
            starting_offset: query.starting_offset,
            max_results: query.max_results.min(u32::MAX as usize) as u32,
        };
        // The answering node checked the same request: its refusal is the caller's.
        let refused = |s: &Status| match s.code() {
            Code::InvalidArgument => Error::InvalidArgument(format!(
                "node {node}: {}",
                s.message().chars().take(512).collect::<String>()
            )),
            _ => from_status(node, s),
        };
        let mut stream = self
            .runtime
            .block_on(client.snapshot_ranges(request))
            .map_err(|s| refused(&s))?
            .into_inner();
        // Each message is awaited on the runtime; the sink runs outside it, as it may block.
        loop {
            let message = self
                .runtime
                .block_on(tokio::time::timeout(timeout, stream.message()))
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "node {node} sent nothing for {} s",
                        timeout.as_secs()
                    ))
                })?
                .map_err(|s| refused(&s))?;
            match message.and_then(|m| m.kind) {
                Some(proto::snapshot_ranges_message::Kind::Page(p)) => {
                    let page = RangePage {
                        capacity_bytes: p.capacity_bytes,
                        ranges: p
                            .ranges
                            .into_iter()
                            .map(|r| BlockRange {
                                offset: r.offset,
                                length: r.length,
                            })
                            .collect(),
                    };
                    if !sink(page) {
                        return Ok(());
                    }
                }
                Some(proto::snapshot_ranges_message::Kind::End(_)) => return Ok(()),
                None => {
                    return Err(Error::Unavailable(format!(
                        "the stream from node {node} ended before its end"
                    )));
                }
            }
        }
    }

    fn release(&self, node: &str, read_id: &str) -> Result<(), Error> {
        let mut client = self.client(node)?;
        self.runtime
            .block_on(client.release(proto::ReleaseRequest {
                read_id: read_id.to_owned(),
            }))
            .map_err(|s| from_status(node, &s))?;
        Ok(())
    }
}
