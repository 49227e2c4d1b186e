//! The questions and answers of changed block tracking, as the peer service and the CSI
//! service both carry them: which ranges of a snapshot (or between two snapshots) to list,
//! from where, and the pages of ranges that answer.

use crate::error::{Error, Result};
use crate::validate;

/// Tuples per message when the caller does not say.
pub const DEFAULT_PAGE: usize = 1024;
/// At most this many tuples per message whatever the caller asks: about 24 KiB encoded.
pub const MAX_PAGE: usize = 4096;
/// A run of bytes: `length` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub offset: u64,
    pub length: u64,
}

impl BlockRange {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// What is asked: the allocated ranges of `target`, or (with `base`) the ranges that differ
/// between `base` and `target`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeQuery {
    pub base: Option<String>,
    pub target: String,
    pub starting_offset: u64,
    /// Tuples per message; 0 lets this side choose.
    pub max_results: usize,
}

impl RangeQuery {
    /// Checks the request fields as the CSI messages carry them.
    pub fn new(
        base: Option<&str>,
        target: &str,
        starting_offset: i64,
        max_results: i32,
    ) -> Result<Self> {
        let target_field = if base.is_some() {
            "target_snapshot_id"
        } else {
            "snapshot_id"
        };
        if let Some(base) = base {
            validate::required_str("base_snapshot_id", base)?;
        }
        validate::required_str(target_field, target)?;
        if starting_offset < 0 {
            return Err(Error::OutOfRange(format!(
                "starting_offset {starting_offset} is negative: give 0, or the byte after the last range received"
            )));
        }
        if max_results < 0 {
            return Err(Error::InvalidArgument(format!(
                "max_results {max_results} is negative: give 0 to let the plugin choose"
            )));
        }
        Ok(RangeQuery {
            base: base.map(str::to_owned),
            target: target.to_owned(),
            starting_offset: starting_offset as u64,
            max_results: max_results as usize,
        })
    }

    pub(crate) fn page_size(&self) -> usize {
        match self.max_results {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }
}

/// One message of an answer: the volume's capacity (the same in every page) and up to a
/// page of ranges, in order, not overlapping any range sent before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePage {
    pub capacity_bytes: u64,
    pub ranges: Vec<BlockRange>,
}

/// Takes each page; `false` when the receiver is gone (the walk stops, quietly).
pub type PageSink<'a> = dyn FnMut(RangePage) -> bool + 'a;

/// Answers questions about the snapshots held on this node (never forwarding them): what
/// the peer service asks of the snapshot metadata service.
pub trait HeldRanges: Send + Sync {
    fn answer_here(&self, query: &RangeQuery, sink: &mut PageSink<'_>) -> Result<()>;
}
