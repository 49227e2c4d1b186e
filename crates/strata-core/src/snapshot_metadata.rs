//! Changed block tracking (the CSI SnapshotMetadata service): which ranges of a snapshot
//! hold data, and which differ between two snapshots of one volume.
//!
//! Snapshots of image volumes are files. The allocated ranges of one are its data ranges
//! (SEEK_DATA/SEEK_HOLE). Between two reflinked snapshots of a volume, a range is unchanged
//! exactly when both map it to the same blocks on disk (FIEMAP), or both read as zeros
//! there; where a mapping says nothing exact (delayed, inline or encoded extents) the two
//! are compared byte for byte, so a changed block is never reported as unchanged. Copied
//! snapshots share nothing, so they are compared by content, a chunk at a time.
//!
//! Ranges are reported as VARIABLE_LENGTH extents: whole runs of changed blocks, so a 1%
//! delta of a large volume is a few thousand tuples, not millions of fixed-size blocks.
//! Every walk streams: memory stays flat whatever the size of the volume.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::backend::Backend;
use crate::block_ranges::{BlockRange, DEFAULT_PAGE, HeldRanges, PageSink, RangePage, RangeQuery};
use crate::error::IoContext;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::model::{ContentSource, CopyMethod, SnapshotRecord};
use crate::os::extents::{Extent, Extents, next_data};
use crate::peer::Forwarding;
use crate::snapshot::Snapshots;

/// Blocks compared by content are this size: the pools' filesystem block.
pub const BLOCK: u64 = 4096;
/// Content is compared this much at a time (twice this in memory).
const CHUNK: u64 = 1 << 20;
/// How many times a forwarded stream that broke is resumed before UNAVAILABLE.
const RESUMES: usize = 3;

/// The SnapshotMetadata service's work: answers for the snapshots of this node, and
/// forwards questions about another node's snapshots to it.
pub struct SnapshotMetadata {
    snapshots: Arc<Snapshots>,
    backend: Arc<dyn Backend>,
    forwarding: Option<Arc<Forwarding>>,
    crash: FaultPoints,
}

impl SnapshotMetadata {
    pub fn new(
        snapshots: Arc<Snapshots>,
        backend: Arc<dyn Backend>,
        forwarding: Option<Arc<Forwarding>>,
        crash: FaultPoints,
    ) -> Self {
        SnapshotMetadata {
            snapshots,
            backend,
            forwarding,
            crash,
        }
    }

    /// Whether this node's snapshots have a block layout to describe.
    pub fn offered(&self) -> bool {
        self.backend.block_layout()
    }

    /// Answers `query` page by page into `sink`, here or on the node holding the
    /// snapshots.
    pub fn answer(&self, query: &RangeQuery, sink: &mut PageSink<'_>) -> Result<()> {
        self.check_offered()?;
        let target_here = self.snapshots.get(&query.target).ok();
        let base_here = query
            .base
            .as_ref()
            .map(|base| self.snapshots.get(base).ok());
        match (target_here, base_here) {
            (Some(target), None) => self.local(None, &target, query, sink),
            (Some(target), Some(Some(base))) => self.local(Some(&base), &target, query, sink),
            (target, base) => {
                let Some(forwarding) = &self.forwarding else {
                    return Err(not_found(target.is_none(), query));
                };
                let target_node = match &target {
                    Some(_) => None,
                    None => Some(
                        forwarding
                            .holder(&ContentSource::Snapshot(query.target.clone()))?
                            .ok_or_else(|| not_found(true, query))?,
                    ),
                };
                let base_node = match (&query.base, &base) {
                    (Some(id), Some(None)) => Some(
                        forwarding
                            .holder(&ContentSource::Snapshot(id.clone()))?
                            .ok_or_else(|| not_found(false, query))?,
                    ),
                    _ => None,
                };
                match (target_node, base_node, query.base.is_some()) {
                    (Some(node), None, false) => self.forward(forwarding, &node, query, sink),
                    (Some(t), Some(b), true) if t == b => self.forward(forwarding, &t, query, sink),
                    (t, b, _) => Err(Error::FailedPrecondition(format!(
                        "snapshots {} (on node {}) and {} (on node {}) are on different nodes (the volume moved between them): take a full backup from the target",
                        query.base.as_deref().unwrap_or_default(),
                        b.as_deref().unwrap_or(forwarding.node_id()),
                        query.target,
                        t.as_deref().unwrap_or(forwarding.node_id()),
                    ))),
                }
            }
        }
    }

    fn check_offered(&self) -> Result<()> {
        if self.offered() {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "the {} backend keeps no block layout of its snapshots, so it cannot tell which blocks changed: take a full backup (changed block tracking needs image volumes)",
            self.backend.kind()
        )))
    }

    fn local(
        &self,
        base: Option<&SnapshotRecord>,
        target: &SnapshotRecord,
        query: &RangeQuery,
        sink: &mut PageSink<'_>,
    ) -> Result<()> {
        let capacity = target.size_bytes;
        if query.starting_offset > capacity {
            return Err(Error::OutOfRange(format!(
                "starting_offset {} is past the end of the {capacity}-byte volume",
                query.starting_offset
            )));
        }
        if let Some(base) = base {
            if base.source_volume_id != target.source_volume_id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshots {} and {} are of different volumes ({} and {}): a delta is only between snapshots of one volume",
                    base.id, target.id, base.source_volume_id, target.source_volume_id
                )));
            }
            if (base.created_unix, base.created_nanos) > (target.created_unix, target.created_nanos)
            {
                return Err(Error::InvalidArgument(format!(
                    "base snapshot {} was taken after target snapshot {}: swap them",
                    base.id, target.id
                )));
            }
        }
        // Held open while pinned: a delete after this point leaves the open files readable.
        let target_file = self.open(target)?;
        let base_file = base.map(|b| self.open(b)).transpose()?;
        let start = query.starting_offset;
        let walk: Box<dyn RangeWalk + '_> = match (&base_file, base) {
            (None, _) => Box::new(Allocated {
                file: &target_file,
                at: start,
                end: capacity,
            }),
            (Some(base_file), Some(base))
                if base.method == CopyMethod::Reflink && target.method == CopyMethod::Reflink =>
            {
                Box::new(SharedExtentDelta::new(
                    base_file,
                    &target_file,
                    start,
                    capacity,
                ))
            }
            (Some(base_file), _) => {
                Box::new(ContentDelta::new(base_file, &target_file, start, capacity))
            }
        };
        let mut pager = Pager::new(capacity, start, query.page_size(), sink);
        pager.run(walk)
    }

    fn open(&self, snap: &SnapshotRecord) -> Result<File> {
        let (snap, _pin) = self.snapshots.pin(&snap.id)?;
        self.backend.open_data(&self.snapshots.dir(&snap.id))
    }

    /// Streams the answer from `node`; a stream that breaks is asked again from the byte
    /// after the last range received, a few times, before UNAVAILABLE.
    fn forward(
        &self,
        forwarding: &Forwarding,
        node: &str,
        query: &RangeQuery,
        sink: &mut PageSink<'_>,
    ) -> Result<()> {
        tracing::info!(to_node = node, snapshot_id = %query.target, "forwarding a snapshot metadata request to the snapshot's node");
        let mut query = query.clone();
        let mut receiver_gone = false;
        let mut resumes = 0;
        loop {
            let mut next = query.starting_offset;
            let result = forwarding.snapshot_ranges(node, &query, &mut |page: RangePage| {
                if let Some(last) = page.ranges.last() {
                    next = last.end();
                }
                receiver_gone = !sink(page);
                !receiver_gone
            });
            match result {
                Err(Error::Unavailable(m)) if !receiver_gone && resumes < RESUMES => {
                    resumes += 1;
                    tracing::warn!(to_node = node, resume_at = next, error = %m, "snapshot metadata stream broke; resuming");
                    query.starting_offset = next;
                }
                other => return other,
            }
        }
    }
}

impl HeldRanges for SnapshotMetadata {
    /// Answers a question another node forwarded: only about snapshots held here, never
    /// forwarded again.
    fn answer_here(&self, query: &RangeQuery, sink: &mut PageSink<'_>) -> Result<()> {
        self.check_offered()?;
        let target = self.snapshots.get(&query.target)?;
        let base = match &query.base {
            Some(base) => Some(self.snapshots.get(base).map_err(|_| {
                Error::FailedPrecondition(format!(
                    "snapshot {base} is not on the node that holds {}: take a full backup from the target",
                    query.target
                ))
            })?),
            None => None,
        };
        // A fault point after each page sent to the asking node: the tests kill this node
        // mid-stream there.
        let crash = &self.crash;
        self.local(base.as_ref(), &target, query, &mut |page: RangePage| {
            let more = sink(page);
            crash.reach("metadata:after-forwarded-page");
            more
        })
    }
}

fn not_found(target: bool, query: &RangeQuery) -> Error {
    let id = if target {
        &query.target
    } else {
        query.base.as_ref().unwrap_or(&query.target)
    };
    Error::NotFound(format!("snapshot {id:?} does not exist"))
}

/// The ranges where `target` differs from `base` up to `end`, touching ranges joined: by
/// shared extents when `target` was reflinked from `base` (`shared`), else by content. At
/// most `limit` ranges (RESOURCE_EXHAUSTED past that), so the answer's memory is bounded.
pub(crate) fn changed_ranges(
    base: &File,
    target: &File,
    shared: bool,
    end: u64,
    limit: usize,
) -> Result<Vec<BlockRange>> {
    let mut walk: Box<dyn RangeWalk + '_> = if shared {
        Box::new(SharedExtentDelta::new(base, target, 0, end))
    } else {
        Box::new(ContentDelta::new(base, target, 0, end))
    };
    let mut ranges: Vec<BlockRange> = vec![];
    while let Some(r) = walk.next_range()? {
        let stop = r.end().min(end);
        if stop <= r.offset {
            continue;
        }
        if let Some(last) = ranges.last_mut().filter(|l| l.end() >= r.offset) {
            last.length = stop.max(last.end()) - last.offset;
            continue;
        }
        if ranges.len() >= limit {
            return Err(Error::ResourceExhausted(format!(
                "more than {limit} separate ranges changed; retry when fewer writes are in flight"
            )));
        }
        ranges.push(BlockRange {
            offset: r.offset,
            length: stop - r.offset,
        });
    }
    Ok(ranges)
}

/// A walk over ranges in increasing order; adjacent ranges may touch.
trait RangeWalk {
    fn next_range(&mut self) -> Result<Option<BlockRange>>;
}

/// Collects ranges into pages: touching ranges joined, the first clipped at the starting
/// offset, all clipped at the capacity. At least one page is sent, so the capacity is told
/// even when no range is.
struct Pager<'s, 'a> {
    capacity: u64,
    start: u64,
    size: usize,
    page: Vec<BlockRange>,
    sent: bool,
    sink: &'s mut PageSink<'a>,
}

impl<'s, 'a> Pager<'s, 'a> {
    fn new(capacity: u64, start: u64, size: usize, sink: &'s mut PageSink<'a>) -> Self {
        Pager {
            capacity,
            start,
            size,
            page: Vec::with_capacity(size.min(DEFAULT_PAGE)),
            sent: false,
            sink,
        }
    }

    fn run(&mut self, mut walk: Box<dyn RangeWalk + '_>) -> Result<()> {
        let mut current: Option<BlockRange> = None;
        while let Some(r) = walk.next_range()? {
            let offset = r.offset.max(self.start);
            let end = r.end().min(self.capacity);
            if end <= offset {
                continue;
            }
            match &mut current {
                Some(c) if c.end() >= offset => c.length = end.max(c.end()) - c.offset,
                _ => {
                    let next = BlockRange {
                        offset,
                        length: end - offset,
                    };
                    if let Some(done) = current.replace(next)
                        && !self.push(done)
                    {
                        return Ok(());
                    }
                }
            }
        }
        if let Some(done) = current
            && !self.push(done)
        {
            return Ok(());
        }
        if !self.page.is_empty() || !self.sent {
            self.flush();
        }
        Ok(())
    }

    fn push(&mut self, range: BlockRange) -> bool {
        self.page.push(range);
        self.page.len() < self.size || self.flush()
    }

    fn flush(&mut self) -> bool {
        self.sent = true;
        let ranges = std::mem::take(&mut self.page);
        (self.sink)(RangePage {
            capacity_bytes: self.capacity,
            ranges,
        })
    }
}

/// The data ranges of one snapshot.
struct Allocated<'f> {
    file: &'f File,
    at: u64,
    end: u64,
}

impl RangeWalk for Allocated<'_> {
    fn next_range(&mut self) -> Result<Option<BlockRange>> {
        if self.at >= self.end {
            return Ok(None);
        }
        let found = next_data(self.file, self.at).ctx(|| "find the data of a snapshot")?;
        Ok(found.map(|(start, end)| {
            self.at = end.max(self.at + 1);
            BlockRange {
                offset: start,
                length: end - start,
            }
        }))
    }
}

/// Compares `base` and `target` by content over a span, a chunk at a time, reporting the
/// blocks that differ (bytes past the end of a file read as zeros, as holes do).
struct Comparer<'f> {
    base: &'f File,
    target: &'f File,
    a: Vec<u8>,
    b: Vec<u8>,
}

impl<'f> Comparer<'f> {
    fn new(base: &'f File, target: &'f File) -> Self {
        Comparer {
            base,
            target,
            a: vec![0; CHUNK as usize],
            b: vec![0; CHUNK as usize],
        }
    }

    /// Compares `[at, end)` up to a chunk of it; returns where it stopped and queues the
    /// differing blocks.
    fn step(&mut self, at: u64, end: u64, out: &mut VecDeque<BlockRange>) -> Result<u64> {
        let len = (end - at).min(CHUNK) as usize;
        read_full(self.base, &mut self.a[..len], at)?;
        read_full(self.target, &mut self.b[..len], at)?;
        let mut pos = 0;
        while pos < len {
            let n = (BLOCK as usize).min(len - pos);
            if self.a[pos..pos + n] != self.b[pos..pos + n] {
                let offset = at + pos as u64;
                match out.back_mut() {
                    Some(last) if last.end() == offset => last.length += n as u64,
                    _ => out.push_back(BlockRange {
                        offset,
                        length: n as u64,
                    }),
                }
            }
            pos += n;
        }
        Ok(at + len as u64)
    }
}

/// Reads `buf.len()` bytes at `offset`, zeros past the end of the file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .ctx(|| "read a snapshot")?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// The delta between two snapshots that share nothing: every range where either holds
/// data is compared by content.
struct ContentDelta<'f> {
    comparer: Comparer<'f>,
    at: u64,
    end: u64,
    queued: VecDeque<BlockRange>,
}

impl<'f> ContentDelta<'f> {
    fn new(base: &'f File, target: &'f File, start: u64, end: u64) -> Self {
        ContentDelta {
            comparer: Comparer::new(base, target),
            at: start - start % BLOCK,
            end,
            queued: VecDeque::new(),
        }
    }
}

impl RangeWalk for ContentDelta<'_> {
    fn next_range(&mut self) -> Result<Option<BlockRange>> {
        loop {
            if let Some(r) = self.queued.pop_front() {
                return Ok(Some(r));
            }
            if self.at >= self.end {
                return Ok(None);
            }
            // Where both are holes nothing changed: skip to the next data of either.
            let a = next_data(self.comparer.base, self.at).ctx(|| "find the data of a snapshot")?;
            let b =
                next_data(self.comparer.target, self.at).ctx(|| "find the data of a snapshot")?;
            let next = match (a, b) {
                (None, None) => return Ok(None),
                (Some((x, _)), None) | (None, Some((x, _))) => x,
                (Some((x, _)), Some((y, _))) => x.min(y),
            };
            let from = next.max(self.at);
            let from = from - from % BLOCK;
            if from >= self.end {
                return Ok(None);
            }
            let to = from.saturating_add(CHUNK).min(self.end);
            self.at = self.comparer.step(from, to, &mut self.queued)?;
        }
    }
}

/// What one side holds over a span: nothing readable but zeros, or an extent.
#[derive(Clone, Copy)]
enum Side {
    Zeros,
    Data(Extent),
}

/// The delta between two reflinked snapshots of one volume: the ranges their extent maps
/// do not share.
struct SharedExtentDelta<'f> {
    base: Extents<'f>,
    target: Extents<'f>,
    comparer: Comparer<'f>,
    at: u64,
    end: u64,
    /// A span whose mappings say nothing exact, being compared by content.
    comparing: Option<u64>,
    queued: VecDeque<BlockRange>,
}

impl<'f> SharedExtentDelta<'f> {
    fn new(base: &'f File, target: &'f File, start: u64, end: u64) -> Self {
        SharedExtentDelta {
            base: Extents::new(base, start),
            target: Extents::new(target, start),
            comparer: Comparer::new(base, target),
            at: start,
            end,
            comparing: None,
            queued: VecDeque::new(),
        }
    }

    /// What `extents` holds at `at`, and up to where that lasts.
    fn side(extents: &mut Extents<'_>, at: u64, end: u64) -> Result<(Side, u64)> {
        Ok(
            match extents
                .peek_after(at)
                .ctx(|| "map the extents of a snapshot")?
            {
                None => (Side::Zeros, end),
                Some(e) if e.logical > at => (Side::Zeros, e.logical.min(end)),
                Some(e) if e.reads_as_zeros() => (Side::Zeros, e.end().min(end)),
                Some(e) => (Side::Data(e), e.end().min(end)),
            },
        )
    }
}

impl RangeWalk for SharedExtentDelta<'_> {
    fn next_range(&mut self) -> Result<Option<BlockRange>> {
        loop {
            if let Some(r) = self.queued.pop_front() {
                return Ok(Some(r));
            }
            if let Some(until) = self.comparing {
                self.at = self.comparer.step(self.at, until, &mut self.queued)?;
                if self.at >= until {
                    self.comparing = None;
                }
                continue;
            }
            if self.at >= self.end {
                return Ok(None);
            }
            let (a, a_until) = Self::side(&mut self.base, self.at, self.end)?;
            let (b, b_until) = Self::side(&mut self.target, self.at, self.end)?;
            let until = a_until.min(b_until).max(self.at + 1);
            let span = BlockRange {
                offset: self.at,
                length: until - self.at,
            };
            match (a, b) {
                (Side::Zeros, Side::Zeros) => {}
                (Side::Data(x), Side::Data(y))
                    if x.physical_is_exact() && y.physical_is_exact() =>
                {
                    let px = x.physical.wrapping_add(self.at - x.logical);
                    let py = y.physical.wrapping_add(self.at - y.logical);
                    if px != py {
                        self.queued.push_back(span);
                    }
                }
                (Side::Data(_), Side::Data(_)) => {
                    self.comparing = Some(until);
                    continue;
                }
                _ => self.queued.push_back(span),
            }
            self.at = until;
        }
    }
}

#[cfg(test)]
mod tests;
