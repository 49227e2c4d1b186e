//! Restore and clone from a source another node holds: find the node (the id's hint, or
//! every node this one reaches), open a consistent read there, pull its allocated extents
//! into the new volume's data, verifying every chunk, and release the read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Chunk, Named, Peers, RemoteRead, SourceInfo};
use crate::error::{Error, IoContext, Result};
use crate::fault::FaultPoints;
use crate::ids::NodeHint;
use crate::model::ContentSource;
use crate::os::tree_import::{ImportError, TreeImport};

/// How often a broken stream is resumed before the copy fails (UNAVAILABLE, retried by the
/// caller with a new read).
const RESUMES: u32 = 3;

/// Where a copy from another node goes.
#[derive(Clone, Copy)]
pub enum CopyInto<'a> {
    /// A new volume's data file, all holes (the image backend): each chunk is written at
    /// its offset.
    Blocks(&'a File),
    /// A new volume's empty data directory (btrfs, dir): the tree stream is applied
    /// under it.
    Tree(&'a File),
}

/// Counters of cross-node copies, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct CopyFigures {
    pub bytes_pulled: AtomicU64,
    pub copies_done: AtomicU64,
    pub copies_failed: AtomicU64,
    pub copies_in_flight: AtomicU64,
    /// Total time of finished copies, in milliseconds.
    pub copy_millis: AtomicU64,
}

/// Counts a copy in flight while it runs.
struct InFlight<'a>(&'a CopyFigures);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.copies_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies from other nodes, for CreateVolume.
pub struct RemoteCopies {
    peers: Arc<dyn Peers>,
    node_id: String,
    hint: NodeHint,
    resume_pause: Duration,
    figures: CopyFigures,
    crash: FaultPoints,
}

impl RemoteCopies {
    pub fn new(peers: Arc<dyn Peers>, node_id: &str, crash: FaultPoints) -> Self {
        RemoteCopies {
            peers,
            node_id: node_id.to_owned(),
            hint: NodeHint::of(node_id),
            resume_pause: Duration::from_secs(1),
            figures: CopyFigures::default(),
            crash,
        }
    }

    pub fn figures(&self) -> &CopyFigures {
        &self.figures
    }

    /// The node that holds `source`, when this one does not, and what it holds. `None`
    /// when no node holds it (or the id says it was made here). UNAVAILABLE when a node
    /// that may hold it cannot be asked.
    pub fn locate(&self, source: &ContentSource) -> Result<Option<(String, SourceInfo)>> {
        super::locate(self.peers.as_ref(), &self.node_id, &self.hint, source)
    }

    /// Pulls `source` from `node` into `into` (a new volume's data, `capacity` bytes): only
    /// allocated extents travel, each chunk checked against its CRC-32, a broken stream
    /// resumed where it stopped. Returns what the read was a copy of.
    pub fn pull(
        &self,
        node: &str,
        source: &ContentSource,
        into: CopyInto<'_>,
        capacity: u64,
    ) -> Result<SourceInfo> {
        let read = self.peers.open_read(node, source);
        self.pull_opened(node, source, read, into, capacity)
    }

    /// Pulls a read already opened on `node` (or the error opening it) into `into`, as
    /// [`pull`](Self::pull) does, and releases it.
    pub fn pull_opened(
        &self,
        node: &str,
        source: &ContentSource,
        read: Result<RemoteRead>,
        into: CopyInto<'_>,
        capacity: u64,
    ) -> Result<SourceInfo> {
        let started = Instant::now();
        self.figures
            .copies_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.figures);
        let pulled = read.and_then(|read| {
            let streamed = self.stream(node, source, &read, into, capacity);
            if let Err(e) = self.peers.release(node, &read.read_id) {
                // The read expires on its node when idle; nothing is lost.
                tracing::warn!(node, read_id = %read.read_id, error = %e, "could not release a peer read");
            }
            streamed.map(|bytes| (read, bytes))
        });
        let millis = started.elapsed().as_millis() as u64;
        match pulled {
            Ok((read, bytes)) => {
                self.figures.copies_done.fetch_add(1, Ordering::Relaxed);
                self.figures
                    .copy_millis
                    .fetch_add(millis, Ordering::Relaxed);
                tracing::info!(source = %Named(source), from_node = node, to_node = %self.node_id,
                    bytes, millis, "copied from another node");
                Ok(read.source)
            }
            Err(e) => {
                self.figures.copies_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %Named(source), from_node = node, to_node = %self.node_id,
                    millis, error = %e, "copy from another node failed");
                Err(e)
            }
        }
    }

    /// Streams the read into `into`, resuming a broken stream; returns the bytes written.
    fn stream(
        &self,
        node: &str,
        source: &ContentSource,
        read: &RemoteRead,
        into: CopyInto<'_>,
        capacity: u64,
    ) -> Result<u64> {
        let size = read.source.size_bytes;
        if size > capacity {
            return Err(Error::Aborted(format!(
                "{} on node {node} grew to {size} bytes while the copy started; retry",
                Named(source)
            )));
        }
        let mut target = match into {
            CopyInto::Blocks(file) => Target::Blocks(file),
            CopyInto::Tree(root) => Target::Tree(TreeImport::new(
                root.try_clone()
                    .ctx(|| format!("hold the copy of {}", Named(source)))?,
                capacity,
            )),
        };
        let mut next = 0u64;
        let mut written = 0u64;
        let mut resumes = 0;
        loop {
            let (mut bytes, mut chunks) = (0u64, 0u64);
            let from = next;
            let mut sink = |c: Chunk<'_>| -> Result<()> {
                let len = c.bytes.len() as u64;
                // Blocks: anywhere ahead, inside the volume. A tree: exactly the next bytes.
                let fits = match &target {
                    Target::Blocks(_) => c
                        .offset
                        .checked_add(len)
                        .filter(|e| *e <= size && c.offset >= next),
                    Target::Tree(import) => {
                        (c.offset == import.position()).then(|| c.offset.saturating_add(len))
                    }
                };
                let Some(end) = fits else {
                    return Err(Error::Internal(format!(
                        "node {node} sent {len} bytes at offset {} of {}, outside what is left to copy (from {next} to {size}): run the same Strata version on every node",
                        c.offset,
                        Named(source)
                    )));
                };
                if crc32fast::hash(c.bytes) != c.crc32 {
                    return Err(Error::Unavailable(format!(
                        "{len} bytes of {} from node {node} at offset {} failed their checksum",
                        Named(source),
                        c.offset
                    )));
                }
                match &mut target {
                    Target::Tree(import) => import
                        .feed(c.bytes)
                        .map_err(|e| import_error(e, node, source))?,
                    Target::Blocks(file) => file
                        .write_all_at(c.bytes, c.offset)
                        .ctx(|| format!("write the copy of {} at {}", Named(source), c.offset))?,
                }
                next = end;
                bytes += len;
                chunks += 1;
                self.crash.reach("copy:after-chunk");
                Ok(())
            };
            let streamed = self.peers.read(node, &read.read_id, from, &mut sink);
            written += bytes;
            self.figures
                .bytes_pulled
                .fetch_add(bytes, Ordering::Relaxed);
            match streamed {
                Ok(end)
                    if end.data_bytes == bytes
                        && end.chunks == chunks
                        && end.size_bytes == size =>
                {
                    break;
                }
                Ok(end) => {
                    return Err(Error::Internal(format!(
                        "node {node} ended the stream of {} with {} bytes in {} chunks of {} bytes, but {bytes} bytes in {chunks} chunks arrived",
                        Named(source),
                        end.data_bytes,
                        end.chunks,
                        end.size_bytes
                    )));
                }
                Err(Error::Unavailable(m)) if resumes < RESUMES => {
                    resumes += 1;
                    tracing::warn!(source = %Named(source), from_node = node, at = next, error = %m,
                        "the stream broke; resuming");
                    std::thread::sleep(self.resume_pause);
                }
                Err(e) => return Err(e),
            }
        }
        match &target {
            Target::Tree(import) => {
                if !import.finished() {
                    return Err(Error::Internal(format!(
                        "node {node} ended the tree of {} before its end: run the same Strata version on every node",
                        Named(source)
                    )));
                }
                import
                    .sync()
                    .ctx(|| format!("flush the copy of {}", Named(source)))?;
            }
            Target::Blocks(file) => file
                .sync_all()
                .ctx(|| format!("flush the copy of {}", Named(source)))?,
        }
        Ok(written)
    }
}

/// A copy's destination while it runs: the data file, or the import applying the tree.
enum Target<'a> {
    Blocks(&'a File),
    Tree(TreeImport),
}

/// What a failed tree import means for the copy.
fn import_error(e: ImportError, node: &str, source: &ContentSource) -> Error {
    match e {
        ImportError::Malformed(m) => Error::Internal(format!(
            "node {node} sent a tree of {} this version cannot read ({m}): run the same Strata version on every node",
            Named(source)
        )),
        ImportError::TooLarge { limit } => Error::ResourceExhausted(format!(
            "{} on node {node} holds more than the new volume's {limit} bytes (its file data, and {} bytes and the name of each entry): ask for a larger volume",
            Named(source),
            crate::os::tree_import::ENTRY_BYTES
        )),
        ImportError::Io(what, e) => {
            Error::io(format!("{what} in the copy of {}", Named(source)), e)
        }
    }
}
