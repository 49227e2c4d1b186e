//! How long group snapshots keep their sources frozen: the figures since the server
//! started, which the metrics read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Freeze windows of group snapshots since the server started, read by the metrics.
#[derive(Debug, Default)]
pub struct FreezeStats {
    groups: AtomicU64,
    last_micros: AtomicU64,
    max_micros: AtomicU64,
    over_limit: AtomicU64,
}

/// A copy of [`FreezeStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreezeFigures {
    /// Group snapshots that froze their sources (successful or not).
    pub groups: u64,
    pub last_micros: u64,
    pub max_micros: u64,
    /// Freeze windows cut short by the limit.
    pub over_limit: u64,
}

impl FreezeStats {
    /// The figures now.
    pub fn figures(&self) -> FreezeFigures {
        FreezeFigures {
            groups: self.groups.load(Ordering::Relaxed),
            last_micros: self.last_micros.load(Ordering::Relaxed),
            max_micros: self.max_micros.load(Ordering::Relaxed),
            over_limit: self.over_limit.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record(&self, window: Duration, over: bool) {
        let micros = window.as_micros() as u64;
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.last_micros.store(micros, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
        if over {
            self.over_limit.fetch_add(1, Ordering::Relaxed);
        }
    }
}
