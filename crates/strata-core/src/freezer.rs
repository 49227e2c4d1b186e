//! Freezing a volume's filesystem so a copy of it is consistent: one volume at a time
//! (its turn), several at once for a group snapshot, always thawed by a guard, and all
//! thawed at startup after a crash; and the figures of the freeze windows, which the
//! metrics read.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::backend::{Attachment, Backend};
use crate::error::{Error, Result};
use crate::inflight::InFlight;
use crate::mounts::{Mounts, is_device_node_mount};
use crate::os::{Filesystems, FrozenGuard, Host, MountedFs};
use crate::volumes::Volumes;

pub struct Freezer {
    host: Host,
    backend: Arc<dyn Backend>,
    mounts: Arc<Mounts>,
    inflight: Arc<InFlight>,
    stats: FreezeStats,
}

impl Freezer {
    pub fn new(
        host: Host,
        backend: Arc<dyn Backend>,
        mounts: Arc<Mounts>,
        inflight: Arc<InFlight>,
    ) -> Self {
        Freezer {
            host,
            backend,
            mounts,
            inflight,
            stats: FreezeStats::default(),
        }
    }

    /// The freeze windows of group snapshots so far.
    pub fn figures(&self) -> FreezeFigures {
        self.stats.figures()
    }

    /// Records a group snapshot's freeze window, and whether it ran past the limit.
    pub(crate) fn record(&self, window: Duration, over: bool) {
        self.stats.record(window, over);
    }

    /// Thaws a filesystem a watchdog found still frozen past its limit.
    pub(crate) fn thaw(&self, fs: &MountedFs) -> Result<()> {
        Ok(self.host.filesystems.thaw(fs)?)
    }

    /// Thaws every mounted volume filesystem: a crash while a snapshot had one frozen must not
    /// leave it frozen. Thawing a filesystem that is not frozen does nothing.
    pub fn thaw_all(&self, volumes: &Volumes) -> Result<usize> {
        let ours = volumes.devices()?;
        let mut thawed = 0;
        for m in self.host.mounter.mounts()? {
            if ours.contains(&m.device()) && m.root == Path::new("/") {
                let thawed_now = self
                    .host
                    .filesystems
                    .open_mounted(&m.mount_point, m.device())
                    .and_then(|fs| self.host.filesystems.thaw(&fs));
                match thawed_now {
                    Ok(()) => thawed += 1,
                    Err(e) => {
                        tracing::warn!(mount_point = %m.mount_point.display(), error = %e, "could not thaw")
                    }
                }
            }
        }
        Ok(thawed)
    }

    /// Freezes the volume's filesystem if it is mounted on this node, so a copy of its data is
    /// consistent; the guard thaws it. `None` when nothing is mounted (nothing can change).
    pub(crate) fn freeze_if_mounted(&self, id: &str, dir: &Path) -> Result<Option<Frozen<'_>>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        match self.freeze_turn(id, dir, deadline)? {
            Some(turn) => turn.freeze(self.host.filesystems.as_ref()).map(Some),
            None => Ok(None),
        }
    }

    /// The volume's turn to be frozen, taken no later than `deadline` (ABORTED after), and
    /// where its filesystem is mounted on this node; `None` when nothing is mounted.
    pub(crate) fn freeze_turn(
        &self,
        id: &str,
        dir: &Path,
        deadline: std::time::Instant,
    ) -> Result<Option<FreezeTurn>> {
        // Only a volume's own filesystem is frozen; a directory volume shares the pool's
        // filesystem, which is never frozen (its backends copy atomically or file by file).
        let Some(att @ Attachment::Device(_)) = self.backend.attachment(dir)? else {
            return Ok(None);
        };
        // Readers of one volume run together, but freeze it one at a time: a second
        // FIFREEZE fails, and a thaw must not come while another copy runs.
        let turn = self
            .inflight
            .acquire_waiting_until(&format!("freeze {id}"), deadline)?;
        let Some(mount) = self
            .mounts
            .mounts_of(&att)?
            .into_iter()
            .find(|m| !is_device_node_mount(m, &att))
        else {
            return Ok(None);
        };
        // Opened and checked now, held until the thaw: the freeze and the thaw act on the
        // volume's filesystem whatever happens to the path in between.
        let fs = self
            .host
            .filesystems
            .open_mounted(&mount.mount_point, mount.device())?;
        Ok(Some(FreezeTurn { fs, turn }))
    }

    /// Freezes every filesystem of `turns` at once (each FIFREEZE flushes its filesystem, so
    /// together they take as long as the slowest, not the sum). All or none: if one fails,
    /// those already frozen are thawed.
    pub(crate) fn freeze_all(&self, turns: Vec<FreezeTurn>) -> Result<Vec<Frozen<'_>>> {
        let results: Vec<Result<Frozen<'_>>> = if turns.len() < 2 {
            turns
                .into_iter()
                .map(|t| t.freeze(self.host.filesystems.as_ref()))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let running: Vec<_> = turns
                    .into_iter()
                    .map(|t| scope.spawn(move || t.freeze(self.host.filesystems.as_ref())))
                    .collect();
                running
                    .into_iter()
                    .map(|r| {
                        r.join().unwrap_or_else(|_| {
                            Err(Error::Internal(
                                "a filesystem freeze did not complete".into(),
                            ))
                        })
                    })
                    .collect()
            })
        };
        let mut frozen = Vec::with_capacity(results.len());
        let mut failed = None;
        for r in results {
            match r {
                Ok(f) => frozen.push(f),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(frozen),
        }
    }
}

/// A volume's turn to freeze its filesystem, and that filesystem, opened and checked.
pub(crate) struct FreezeTurn {
    fs: MountedFs,
    turn: crate::inflight::Guard,
}

impl FreezeTurn {
    fn freeze(self, filesystems: &dyn Filesystems) -> Result<Frozen<'_>> {
        let frozen = FrozenGuard::freeze(filesystems, self.fs)?;
        Ok(Frozen {
            frozen,
            _turn: self.turn,
        })
    }
}

/// A volume's filesystem frozen for a copy, and its turn to be: thawed first, then the turn
/// released (fields drop in order).
pub(crate) struct Frozen<'a> {
    frozen: FrozenGuard<'a>,
    _turn: crate::inflight::Guard,
}

impl Frozen<'_> {
    pub(crate) fn fs(&self) -> &MountedFs {
        self.frozen.fs()
    }

    pub(crate) fn mark_thawed(&mut self) {
        self.frozen.mark_thawed();
    }
}

/// Thaws every filesystem of `frozen` at once, then releases their turns.
pub(crate) fn thaw_together(mut frozen: Vec<Frozen<'_>>) {
    if frozen.len() > 1 {
        std::thread::scope(|scope| {
            for f in frozen.iter_mut() {
                scope.spawn(move || f.frozen.thaw());
            }
        });
    }
    drop(frozen);
}

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
