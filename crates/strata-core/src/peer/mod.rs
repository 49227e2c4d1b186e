//! Volumes beyond their node: what a node offers other Strata nodes ([`Exports`]: look up a
//! snapshot or volume, open a consistent read of it, stream its allocated extents) and what
//! it takes from them ([`RemoteCopies`]: restore and clone from a source another node
//! holds). The transport (gRPC over mutual TLS) lives in the server; this module sees other
//! nodes only through [`Peers`].

pub mod bulk_wire;
pub mod cluster;
pub mod copies;
pub mod exports;
pub mod forward;

pub use cluster::Cluster;
pub use copies::{CopyFigures, CopyInto, RemoteCopies};
pub use exports::{ExportLimits, ExportSources, Exports, OpenedRead};
pub use forward::Forwarding;

use std::fmt;

use crate::error::{Error, Result};
use crate::ids::NodeHint;
use crate::model::{ContentSource, FormatState};

/// What a node says about a snapshot or a volume it holds: what a copy of it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// Size of the data (a volume's capacity; a snapshot's source size).
    pub size_bytes: u64,
    /// The filesystem state a copy inherits.
    pub format: FormatState,
    /// The backend holding it (`image`, `btrfs`, `dir`).
    pub backend: String,
    /// Its wrapped key when it is encrypted: a copy keeps it.
    pub encryption: Option<crate::encryption::WrappedKey>,
}

impl SourceInfo {
    /// Whether the data travels as a directory tree (the btrfs and dir backends), not as
    /// the blocks of one file (image).
    pub fn is_tree(&self) -> bool {
        matches!(self.backend.as_str(), "btrfs" | "dir")
    }
}

/// A read opened on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRead {
    pub read_id: String,
    pub source: SourceInfo,
    pub allocated_bytes: u64,
}

/// What a complete stream carried, as the sender counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadEnd {
    pub data_bytes: u64,
    pub chunks: u64,
    pub size_bytes: u64,
}

/// Bytes of a read at `offset`, with the CRC-32 the sender computed.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
    pub crc32: u32,
}

/// The other Strata nodes, as this node reaches them. Errors say what happened in the
/// core's terms: an unreachable or timed-out node is [`Error::Unavailable`], an answer is
/// mapped to the error the node sent.
pub trait Peers: Send + Sync {
    /// The nodes this node can reach, by node id.
    fn nodes(&self) -> Result<Vec<String>>;
    /// The node that holds `source` as the cluster records it, for ids without a node
    /// hint (made before hints); `None` when nothing records it.
    fn holder(&self, _source: &ContentSource) -> Result<Option<String>> {
        Ok(None)
    }
    /// Every node the cluster has (its Node objects), when the peers come from a cluster
    /// that says; `None` otherwise (static peers: a node not listed may still exist).
    fn cluster_nodes(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
    /// The node a volume is pinned to as the cluster records it: by its PV's name when
    /// the caller knows it (one read), else by its handle.
    fn volume_holder(&self, volume_id: &str, _pv_name: Option<&str>) -> Result<Option<String>> {
        self.holder(&ContentSource::Volume(volume_id.to_owned()))
    }
    /// What `node` holds under `source`'s id, if anything.
    fn lookup(&self, node: &str, source: &ContentSource) -> Result<Option<SourceInfo>>;
    /// Opens a consistent read of `source` on `node`.
    fn open_read(&self, node: &str, source: &ContentSource) -> Result<RemoteRead>;
    /// Streams the read's allocated extents from `from` on, handing each chunk to `sink`
    /// in offset order; returns the stream's end.
    fn read(
        &self,
        node: &str,
        read_id: &str,
        from: u64,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<()>,
    ) -> Result<ReadEnd>;
    /// Ends a read. Idempotent.
    fn release(&self, node: &str, read_id: &str) -> Result<()>;
    /// Changes the I/O limits of a volume `node` holds (its mutable parameters); done
    /// when `node` has applied them.
    fn modify_volume(
        &self,
        node: &str,
        volume_id: &str,
        parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<()>;
    /// A step of moving `volume_id`, which `node` holds, to this node.
    fn move_out(
        &self,
        node: &str,
        _step: MoveStep,
        _volume_id: &str,
        _move_id: &str,
    ) -> Result<MoveOut> {
        Err(Error::Unavailable(format!(
            "node {node} cannot be asked to move a volume through this transport"
        )))
    }
    /// Streams `node`'s answer to a snapshot metadata question about snapshots it holds,
    /// page by page into `sink`; a broken stream is UNAVAILABLE (the caller resumes).
    fn snapshot_ranges(
        &self,
        node: &str,
        query: &crate::block_ranges::RangeQuery,
        sink: &mut crate::block_ranges::PageSink<'_>,
    ) -> Result<()>;
}

/// A step of moving a volume a node holds to the node that asks ([`crate::moves`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveStep {
    /// Keep a stable copy of the volume and open a read of it (the volume stays in use).
    Precopy,
    /// Seal the volume (refused while it is staged or published) and open a read of what
    /// changed since the pre-copy.
    Final,
    /// Forget the move: unseal the volume and drop the copy. Idempotent.
    Cancel,
}

/// What the node holding a volume answers to a move step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOut {
    /// The read to stream (none for [`MoveStep::Cancel`]).
    pub read: Option<RemoteRead>,
    /// The volume's record as the holder has it (none for [`MoveStep::Cancel`]).
    pub record: Option<crate::model::VolumeRecord>,
}

/// What a departure opens for the peer service to stream ([`Departing`]).
pub struct DepartureRead {
    pub file: std::fs::File,
    pub source: SourceInfo,
    /// The ranges to send; `None`: every allocated extent.
    pub ranges: Option<Vec<crate::block_ranges::BlockRange>>,
    pub record: crate::model::VolumeRecord,
}

/// This node's side of moving its volumes elsewhere, as the peer service reaches it
/// (implemented by [`crate::moves::Departures`]).
pub trait Departing: Send + Sync {
    /// [`MoveStep::Precopy`] or [`MoveStep::Final`] of move `move_id` of `volume_id` to
    /// node `target`.
    fn open_departure(
        &self,
        step: MoveStep,
        volume_id: &str,
        move_id: &str,
        target: &str,
    ) -> Result<DepartureRead>;
    /// [`MoveStep::Cancel`].
    fn cancel_departure(&self, volume_id: &str, move_id: &str) -> Result<()>;
}

/// The filesystem state as the peer protocol carries it.
pub fn format_to_wire(format: &FormatState) -> String {
    match format {
        FormatState::Unformatted => "unformatted".into(),
        FormatState::Formatting(fs) => format!("formatting:{fs}"),
        FormatState::Formatted(fs) => format!("formatted:{fs}"),
    }
}

/// Reads a filesystem state sent by a peer; anything else is refused.
pub fn format_from_wire(wire: &str) -> Result<FormatState> {
    // A filesystem name as a record holds it: short, lowercase letters and digits.
    let known = |fs: &str| {
        (1..=16).contains(&fs.len())
            && fs
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    match wire.split_once(':') {
        None if wire == "unformatted" => Ok(FormatState::Unformatted),
        Some(("formatting", fs)) if known(fs) => Ok(FormatState::Formatting(fs.to_owned())),
        Some(("formatted", fs)) if known(fs) => Ok(FormatState::Formatted(fs.to_owned())),
        _ => Err(Error::Internal(format!(
            "a peer described a source's filesystem as {:?}, which this version does not know: run the same Strata version on every node",
            crate::validate::echo(wire)
        ))),
    }
}

/// The id a content source names.
pub fn source_id(source: &ContentSource) -> &str {
    match source {
        ContentSource::Snapshot(id) | ContentSource::Volume(id) => id,
    }
}

/// `snapshot ID` or `volume ID`, for messages.
pub struct Named<'a>(pub &'a ContentSource);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ContentSource::Snapshot(id) => write!(f, "snapshot {id}"),
            ContentSource::Volume(id) => write!(f, "volume {id}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// The node that holds `source`, when node `node_id` (whose ids carry `own_hint`) does
/// not, and what it holds: by the id's node hint, else as the cluster records it, else by
/// asking every node. `None` when no node holds it (or the id says it was made here).
/// UNAVAILABLE when a node that may hold it cannot be asked.
pub(crate) fn locate(
    peers: &dyn Peers,
    node_id: &str,
    own_hint: &NodeHint,
    source: &ContentSource,
) -> Result<Option<(String, SourceInfo)>> {
    let hint = NodeHint::in_id(source_id(source));
    if hint.as_ref() == Some(own_hint) {
        return Ok(None);
    }
    let holder = match hint {
        Some(_) => None,
        None => peers.holder(source)?,
    };
    let nodes = peers.nodes()?;
    if let Some(holder) = holder.as_ref().filter(|h| !nodes.contains(h)) {
        return Err(Error::Unavailable(format!(
            "{} is on node {holder}, whose peer service is not reachable (no ready endpoint); retry once it is back",
            Named(source)
        )));
    }
    let mut unreachable = vec![];
    let mut asked = 0;
    for node in nodes {
        let candidate = match (&holder, &hint) {
            (Some(holder), _) => node == *holder,
            (None, Some(hint)) => *hint == NodeHint::of(&node),
            (None, None) => true,
        };
        if node == node_id || !candidate {
            continue;
        }
        asked += 1;
        match peers.lookup(&node, source) {
            Ok(Some(info)) => return Ok(Some((node, info))),
            Ok(None) => {}
            Err(Error::Unavailable(m)) => unreachable.push(m),
            Err(e) => return Err(e),
        }
    }
    if asked == 0
        && let Some(hint) = &hint
    {
        // The id names a node whose Node object is gone: it was deleted for good, and what
        // it held with it. Only a list that has this node's own Node says so (a list
        // without it, or an empty one, proves nothing).
        if let Some(all) = peers.cluster_nodes()?
            && all.iter().any(|n| n == node_id)
            && !all.iter().any(|n| NodeHint::of(n) == *hint)
        {
            return Err(Error::NotFound(format!(
                "{} was made on a node (hint {}) that the cluster no longer has (its Node object was deleted): it is gone with that node",
                Named(source),
                hint.as_str()
            )));
        }
        // The id names a node this one cannot see now (not ready, or gone): it may come
        // back, so the caller retries rather than gives up.
        return Err(Error::Unavailable(format!(
            "{} was made on a node (hint {}) that has no reachable peer service now; retry once it is back",
            Named(source),
            hint.as_str()
        )));
    }
    match unreachable.first() {
        Some(first) => Err(Error::Unavailable(format!(
            "{} is not on node {}, and {} node(s) that may hold it cannot be reached ({first}); retry once they are back",
            Named(source),
            node_id,
            unreachable.len()
        ))),
        None => Ok(None),
    }
}
