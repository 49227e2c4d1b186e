//! What this node offers other Strata nodes: a look-up of a snapshot or a volume, a
//! consistent read of it, its allocated extents streamed in checksummed chunks. Reads are
//! bounded (in number, per reader and in all; streams per reader; chunk size) and expire
//! when idle, so a reader that dies leaves nothing held for long.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Chunk, Departing, MoveOut, MoveStep, Named, ReadEnd, RemoteRead, SourceInfo};
use crate::backend::Backend;
use crate::block_ranges::{BlockRange, HeldRanges, PageSink, RangeQuery};
use crate::error::{Error, IoContext, Result};
use crate::freezer::Freezer;
use crate::ids::{is_snapshot_id, is_volume_id};
use crate::inflight::Guard;
use crate::io_limits::{IoLimiter, LimitChange};
use crate::model::ContentSource;
use crate::os::extents::{allocated_bytes, next_data};
use crate::os::tree_export::{self, Stopped};
use crate::snapshot::Snapshots;
use crate::store::remove_object_dir;
use crate::volumes::Volumes;

/// Scratch directory in the pool for the instant copies of live volumes being read.
pub const READS_DIR: &str = "peer-reads";

/// The bounds of what other nodes may hold here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Reads open at once, from all nodes.
    pub max_reads: usize,
    /// Reads open at once by one node.
    pub max_reads_per_peer: usize,
    /// Streams running at once for one node.
    pub max_streams_per_peer: usize,
    /// A read not streamed or opened for this long is closed.
    pub idle: Duration,
    /// The largest chunk sent (the memory one stream holds, with the transport's queue).
    pub chunk_bytes: usize,
}

impl Default for ExportLimits {
    fn default() -> Self {
        ExportLimits {
            max_reads: 64,
            max_reads_per_peer: 16,
            max_streams_per_peer: 8,
            idle: Duration::from_secs(300),
            chunk_bytes: 256 << 10,
        }
    }
}

/// A read as the reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedRead {
    pub read_id: String,
    pub source: SourceInfo,
    pub allocated_bytes: u64,
    pub idle: Duration,
}

/// An open read: the data held open (a snapshot's image, or the instant copy of a volume,
/// whose name is already gone), so nothing that happens to the source changes it.
struct Read {
    data: ReadData,
    source: SourceInfo,
    what: String,
    reader: String,
    last_used: Mutex<Instant>,
    streams: AtomicUsize,
}

impl Read {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last_used.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a read streams.
pub enum ReadData {
    /// One file laid out as the volume (the image backend): its allocated extents, or only
    /// `ranges` (a move's final copy).
    Blocks {
        file: File,
        ranges: Option<Vec<BlockRange>>,
    },
    /// A directory tree (btrfs, dir), as a `tree_stream`. A directory's entries cannot
    /// outlive their names, as an open file's data does: a volume's tree is a copy held in
    /// the scratch directory, a snapshot stays pinned (DeleteSnapshot is ABORTED, and
    /// retried), for as long as the read is open.
    Tree {
        root: File,
        _copy: Option<HeldCopy>,
        _pin: Option<Guard>,
    },
}

/// A copy made for a read, removed when the read goes.
pub struct HeldCopy {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
}

impl Drop for HeldCopy {
    fn drop(&mut self) {
        if let Err(e) = remove_object_dir(&self.dir, self.backend.as_ref()) {
            // Removed at the next start otherwise.
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the copy of a closed read");
        }
    }
}

/// Counts a stream of a read (and of its reader) while it runs.
struct Streaming<'a> {
    exports: &'a Exports,
    read: Arc<Read>,
}

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.read.streams.fetch_sub(1, Ordering::SeqCst);
        self.read.touch();
        let mut streams = self.exports.lock_streams();
        if let Some(n) = streams.get_mut(&self.read.reader) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.read.reader);
            }
        }
    }
}

/// What the peer service reads from and changes on this node.
pub struct ExportSources {
    pub volumes: Arc<Volumes>,
    pub snapshots: Arc<Snapshots>,
    pub freezer: Arc<Freezer>,
    pub backend: Arc<dyn Backend>,
    /// Changes of I/O limits forwarded by the node the resizer called.
    pub io_limits: Arc<IoLimiter>,
    /// Snapshot metadata questions forwarded by the node the backup tool called.
    pub snapshot_metadata: Arc<dyn HeldRanges>,
    /// Moves of this node's volumes to the nodes that ask.
    pub departures: Arc<dyn Departing>,
}

/// The peer service's work on this node.
pub struct Exports {
    node_id: String,
    volumes: Arc<Volumes>,
    snapshots: Arc<Snapshots>,
    freezer: Arc<Freezer>,
    backend: Arc<dyn Backend>,
    scratch: PathBuf,
    limits: ExportLimits,
    /// Changes of I/O limits forwarded by the node the resizer called.
    io_limits: Arc<IoLimiter>,
    snapshot_metadata: Arc<dyn HeldRanges>,
    departures: Arc<dyn Departing>,
    reads: Mutex<HashMap<String, Arc<Read>>>,
    streams: Mutex<HashMap<String, usize>>,
}

impl Exports {
    /// Removes what reads of a previous run left in the scratch directory (a crash between
    /// a volume's instant copy and the removal of its name).
    pub fn new(
        node_id: String,
        pool: &std::path::Path,
        sources: ExportSources,
        limits: ExportLimits,
    ) -> Result<Self> {
        let ExportSources {
            volumes,
            snapshots,
            freezer,
            backend,
            io_limits,
            snapshot_metadata,
            departures,
        } = sources;
        let scratch = pool.join(READS_DIR);
        fs::create_dir_all(&scratch).ctx(|| format!("create {}", scratch.display()))?;
        for entry in fs::read_dir(&scratch).ctx(|| format!("list {}", scratch.display()))? {
            let path = entry.ctx(|| format!("list {}", scratch.display()))?.path();
            tracing::info!(dir = %path.display(), "removing the copy of a read a previous run left");
            remove_object_dir(&path, backend.as_ref())?;
        }
        Ok(Exports {
            node_id,
            volumes,
            snapshots,
            freezer,
            backend,
            scratch,
            limits,
            io_limits,
            snapshot_metadata,
            departures,
            reads: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// A change of a volume's I/O limits, forwarded by another node: applied if the volume
    /// is here (NOT_FOUND otherwise; never forwarded again).
    pub fn modify_volume(
        &self,
        volume_id: &str,
        parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let change = LimitChange::parse(parameters)?;
        self.io_limits.modify(volume_id, &change)
    }

    /// A snapshot metadata question forwarded by another node, about snapshots held here
    /// (NOT_FOUND otherwise; never forwarded again).
    pub fn snapshot_ranges(&self, query: &RangeQuery, sink: &mut PageSink<'_>) -> Result<()> {
        self.snapshot_metadata.answer_here(query, sink)
    }

    pub fn limits(&self) -> ExportLimits {
        self.limits
    }

    fn lock_reads(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Read>>> {
        self.reads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this node holds under `source`'s id; `None` when it holds nothing by that id.
    pub fn lookup(&self, source: &ContentSource) -> Result<Option<SourceInfo>> {
        let found = match source {
            ContentSource::Snapshot(id) if is_snapshot_id(id) => self
                .snapshots
                .get(id)
                .map(|s| (s.size_bytes, s.format, s.encryption)),
            ContentSource::Volume(id) if is_volume_id(id) => self
                .volumes
                .get(id)
                .map(|v| (v.capacity_bytes, v.format, v.encryption)),
            _ => return Ok(None),
        };
        match found {
            Ok((size_bytes, format, encryption)) => Ok(Some(SourceInfo {
                size_bytes,
                format,
                backend: self.backend.kind().to_owned(),
                encryption,
            })),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a consistent read of `source` for `reader`: a snapshot as it is, a volume as an
    /// instant copy (frozen only while the copy is made if it is mounted here).
    pub fn open(&self, source: &ContentSource, reader: &str) -> Result<OpenedRead> {
        self.check_room(reader)?;
        let (data, info) = match source {
            ContentSource::Snapshot(id) => self.open_snapshot(id)?,
            ContentSource::Volume(id) => self.open_volume(id)?,
        };
        self.register(data, info, Named(source).to_string(), reader)
    }

    /// A step of moving volume `volume_id` to node `reader`: the read of its pre-copy or of
    /// its final delta, with its record; nothing for a cancel.
    pub fn move_out(
        &self,
        step: MoveStep,
        volume_id: &str,
        move_id: &str,
        reader: &str,
    ) -> Result<MoveOut> {
        if step == MoveStep::Cancel {
            self.departures.cancel_departure(volume_id, move_id)?;
            return Ok(MoveOut {
                read: None,
                record: None,
            });
        }
        self.check_room(reader)?;
        let opened = self
            .departures
            .open_departure(step, volume_id, move_id, reader)?;
        let what = format!("the move of volume {volume_id} ({step:?})");
        let data = ReadData::Blocks {
            file: opened.file,
            ranges: opened.ranges,
        };
        let read = self.register(data, opened.source, what, reader)?;
        Ok(MoveOut {
            read: Some(RemoteRead {
                read_id: read.read_id,
                source: read.source,
                allocated_bytes: read.allocated_bytes,
            }),
            record: Some(opened.record),
        })
    }

    /// Refuses a new read past the bounds.
    fn check_room(&self, reader: &str) -> Result<()> {
        self.expire();
        {
            let reads = self.lock_reads();
            let by_reader = reads.values().filter(|r| r.reader == reader).count();
            if reads.len() >= self.limits.max_reads || by_reader >= self.limits.max_reads_per_peer {
                return Err(Error::ResourceExhausted(format!(
                    "node {} has {} reads open ({by_reader} by node {reader}); retry when some finish",
                    self.node_id,
                    reads.len()
                )));
            }
        }
        Ok(())
    }

    /// Opens a read of `data`.
    fn register(
        &self,
        data: ReadData,
        info: SourceInfo,
        what: String,
        reader: &str,
    ) -> Result<OpenedRead> {
        let allocated = match &data {
            ReadData::Blocks {
                ranges: Some(ranges),
                ..
            } => ranges.iter().map(|r| r.length).sum(),
            ReadData::Blocks { file, ranges: None } => {
                allocated_bytes(file).ctx(|| format!("stat {what}"))?
            }
            ReadData::Tree { root, .. } => {
                tree_export::allocated(root).ctx(|| format!("measure {what}"))?
            }
        };
        let read_id = format!("read-{}", crate::ids::random_hex(12));
        let read = Arc::new(Read {
            data,
            source: info.clone(),
            what,
            reader: reader.to_owned(),
            last_used: Mutex::new(Instant::now()),
            streams: AtomicUsize::new(0),
        });
        tracing::info!(read_id, reader, source = %read.what, allocated, "peer read opened");
        self.lock_reads().insert(read_id.clone(), read);
        Ok(OpenedRead {
            read_id,
            source: info,
            allocated_bytes: allocated,
            idle: self.limits.idle,
        })
    }

    fn open_snapshot(&self, id: &str) -> Result<(ReadData, SourceInfo)> {
        self.snapshots.get(id)?;
        // Blocks: pinned only while opened, as the open file is the read whatever happens
        // next. A tree: pinned while the read is open.
        let (snap, pin) = self.snapshots.pin(id)?;
        let dir = self.snapshots.dir(&snap.id);
        let data = match self.backend.block_layout() {
            true => ReadData::Blocks {
                file: self.backend.open_data(&dir)?,
                ranges: None,
            },
            false => ReadData::Tree {
                root: self.backend.open_tree(&dir)?,
                _copy: None,
                _pin: Some(pin),
            },
        };
        Ok((
            data,
            SourceInfo {
                size_bytes: snap.size_bytes,
                format: snap.format,
                backend: self.backend.kind().to_owned(),
                encryption: snap.encryption,
            },
        ))
    }

    fn open_volume(&self, id: &str) -> Result<(ReadData, SourceInfo)> {
        let vol = self.volumes.get(id)?;
        let _guard = self.volumes.guard_shared(&vol.id)?;
        let vol = self.volumes.get(id)?;
        let dir = self.volumes.dir(&vol.id);
        let blocks = self.backend.block_layout();
        // Refused before anything is copied where the data could not travel anyway.
        match blocks {
            true => drop(self.backend.open_data(&dir)?),
            false => drop(self.backend.open_tree(&dir)?),
        }
        let copy = self
            .scratch
            .join(format!(".read-{}", crate::ids::random_hex(12)));
        fs::create_dir(&copy).ctx(|| format!("create {}", copy.display()))?;
        let held = HeldCopy {
            dir: copy.clone(),
            backend: self.backend.clone(),
        };
        let copied = self
            .freezer
            .freeze_if_mounted(&vol.id, &dir)
            .and_then(|frozen| {
                let copied = self
                    .backend
                    .copy_from(&dir, &copy, vol.capacity_bytes, true);
                drop(frozen);
                copied
            });
        let data = match blocks {
            // The open file keeps the copy's data; its name goes now (`held` dropped), so
            // a crash or a reader that never comes back leaves nothing in the pool.
            true => ReadData::Blocks {
                file: copied.and_then(|_| self.backend.open_data(&copy))?,
                ranges: None,
            },
            // A crash leaves it for the next start to remove.
            false => ReadData::Tree {
                root: copied.and_then(|_| self.backend.open_tree(&copy))?,
                _copy: Some(held),
                _pin: None,
            },
        };
        Ok((
            data,
            SourceInfo {
                size_bytes: vol.capacity_bytes,
                format: vol.format,
                backend: self.backend.kind().to_owned(),
                encryption: vol.encryption,
            },
        ))
    }

    fn get(&self, read_id: &str) -> Result<Arc<Read>> {
        self.lock_reads().get(read_id).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "read {} is not open on node {} (released, or idle for more than {} s): open it again",
                crate::validate::echo(read_id),
                self.node_id,
                self.limits.idle.as_secs()
            ))
        })
    }

    /// Streams the read's allocated extents from `from` on, in chunks of at most
    /// `chunk_bytes`, each with its CRC-32. `send` returns `false` when the reader is gone.
    pub fn read(
        &self,
        read_id: &str,
        from: u64,
        send: &mut dyn FnMut(Chunk<'_>) -> bool,
    ) -> Result<ReadEnd> {
        let read = self.get(read_id)?;
        let _streaming = self.start_stream(&read)?;
        let size = read.source.size_bytes;
        let (file, ranges) = match &read.data {
            ReadData::Blocks { file, ranges } => (file, ranges),
            ReadData::Tree { root, .. } => return self.read_tree(&read, root, from, send),
        };
        let len = file
            .metadata()
            .ctx(|| format!("stat the data of {}", read.what))?
            .len()
            .min(size);
        let mut end = ReadEnd {
            size_bytes: size,
            ..ReadEnd::default()
        };
        let mut buf = vec![0u8; self.limits.chunk_bytes];
        let mut at = from;
        let mut listed = ranges.as_deref().map(|r| r.iter());
        loop {
            // The next span to send: the next listed range, or the next allocated extent.
            let (start, stop) = match listed.as_mut() {
                Some(ranges) => match ranges.find(|r| r.end() > at) {
                    Some(r) => (r.offset.max(at), r.end().min(size)),
                    None => break,
                },
                None if at >= len => break,
                None => {
                    match next_data(file, at).ctx(|| format!("find the data of {}", read.what))? {
                        Some((start, stop)) => (start, stop.min(len)),
                        None => break,
                    }
                }
            };
            let mut offset = start;
            while offset < stop {
                let n = ((stop - offset) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], offset)
                    .ctx(|| format!("read {} at {offset}", read.what))?;
                let bytes = &buf[..n];
                let chunk = Chunk {
                    offset,
                    bytes,
                    crc32: crc32fast::hash(bytes),
                };
                if !send(chunk) {
                    return Err(Error::Aborted(format!(
                        "node {} stopped reading {}",
                        read.reader, read.what
                    )));
                }
                read.touch();
                end.data_bytes += n as u64;
                end.chunks += 1;
                offset += n as u64;
            }
            at = stop.max(at);
        }
        Ok(end)
    }

    /// Streams a tree read from stream offset `from` on.
    fn read_tree(
        &self,
        read: &Read,
        root: &File,
        from: u64,
        send: &mut dyn FnMut(Chunk<'_>) -> bool,
    ) -> Result<ReadEnd> {
        let walked = tree_export::export(root, from, self.limits.chunk_bytes, &mut |c| {
            let sent = send(Chunk {
                offset: c.offset,
                bytes: c.bytes,
                crc32: crc32fast::hash(c.bytes),
            });
            read.touch();
            sent
        });
        match walked {
            Ok(sent) => Ok(ReadEnd {
                data_bytes: sent.bytes,
                chunks: sent.chunks,
                size_bytes: read.source.size_bytes,
            }),
            Err(Stopped::Receiver) => Err(Error::Aborted(format!(
                "node {} stopped reading {}",
                read.reader, read.what
            ))),
            Err(Stopped::Io(e)) => Err(Error::io(format!("read the tree of {}", read.what), e)),
        }
    }

    fn start_stream(&self, read: &Arc<Read>) -> Result<Streaming<'_>> {
        let mut streams = self.lock_streams();
        let n = streams.entry(read.reader.clone()).or_default();
        if *n >= self.limits.max_streams_per_peer {
            return Err(Error::ResourceExhausted(format!(
                "node {} already streams {n} reads from node {}; retry when one finishes",
                read.reader, self.node_id
            )));
        }
        *n += 1;
        read.streams.fetch_add(1, Ordering::SeqCst);
        Ok(Streaming {
            exports: self,
            read: read.clone(),
        })
    }

    /// Ends a read; its data is freed when the last stream of it ends. Idempotent.
    pub fn release(&self, read_id: &str) {
        // Dropped outside the lock: a held copy is removed then.
        let removed = self.lock_reads().remove(read_id);
        if let Some(read) = removed {
            tracing::info!(read_id, reader = %read.reader, source = %read.what, "peer read released");
        }
    }

    /// Closes reads idle past the limit (not while a stream of them runs).
    pub fn expire(&self) {
        let now = Instant::now();
        // Dropped outside the lock: a held copy is removed then.
        let closed: Vec<(String, Arc<Read>)> = self
            .lock_reads()
            .extract_if(|_, read| {
                read.streams.load(Ordering::SeqCst) == 0 && read.idle_for(now) >= self.limits.idle
            })
            .collect();
        for (id, read) in closed {
            tracing::info!(read_id = %id, reader = %read.reader, source = %read.what, "peer read closed: idle");
        }
    }

    /// Reads open now.
    pub fn open_reads(&self) -> usize {
        self.lock_reads().len()
    }
}
