//! The volumes of this pool: their records (the store), the guard each operation takes on
//! one, their storage grown to a new size, and the loop devices that serve them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::inflight::{Guard, InFlight};
use crate::model::{CapacityRange, FormatState, VolumeRecord};
use crate::os::{FileId, LoopDevices};
use crate::store::VolumeStore;

pub struct Volumes {
    pub(crate) store: VolumeStore,
    backend: Arc<dyn Backend>,
    loops: Arc<dyn LoopDevices>,
    inflight: Arc<InFlight>,
    crash: FaultPoints,
}

impl Volumes {
    pub fn new(
        store: VolumeStore,
        backend: Arc<dyn Backend>,
        loops: Arc<dyn LoopDevices>,
        inflight: Arc<InFlight>,
        crash: FaultPoints,
    ) -> Self {
        Volumes {
            store,
            backend,
            loops,
            inflight,
            crash,
        }
    }

    /// The record of an existing volume, or NOT_FOUND.
    pub(crate) fn get(&self, id: &str) -> Result<VolumeRecord> {
        crate::validate::required_str("volume_id", id)?;
        self.store
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))
    }

    /// Claims the volume for an operation that changes it (ABORTED while another runs).
    pub(crate) fn guard(&self, id: &str) -> Result<Guard> {
        self.inflight.acquire(id)
    }

    /// Claims the volume for an operation that only reads it (see [`InFlight`]).
    pub(crate) fn guard_shared(&self, id: &str) -> Result<Guard> {
        self.inflight.acquire_shared(id)
    }

    /// The volume's directory in the pool.
    pub(crate) fn dir(&self, id: &str) -> PathBuf {
        self.store.dir(id)
    }

    pub fn count(&self) -> usize {
        self.store.len()
    }

    /// Grows a volume's storage to `range` (the caller holds the volume's guard) and
    /// records the new size, with the filesystem marked for growth. A range it already
    /// satisfies changes nothing; one below its size is OUT_OF_RANGE.
    pub(crate) fn grow(
        &self,
        mut record: VolumeRecord,
        range: CapacityRange,
    ) -> Result<VolumeRecord> {
        let id = &record.id;
        if range.limit != 0 && range.limit < record.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {id} is {} bytes, above limit_bytes {}: volumes cannot shrink",
                record.capacity_bytes, range.limit
            )));
        }
        if range.required <= record.capacity_bytes {
            return Ok(record);
        }
        let size = self.backend.size_policy().size_for(range)?;
        let growth = size - record.capacity_bytes;
        let free = self.backend.pool_usage()?.available_bytes;
        if growth > free {
            return Err(Error::ResourceExhausted(format!(
                "the pool has {free} bytes free, less than the {growth} bytes this expansion adds"
            )));
        }
        self.backend.expand(&self.store.dir(id), size)?;
        self.crash.reach("expand:after-grow");
        record.capacity_bytes = size;
        record.resize_pending = matches!(record.format, FormatState::Formatted(_));
        self.store.update(record.clone())?;
        tracing::info!(volume_id = %record.id, size, "volume expanded");
        Ok(record)
    }

    /// The loop devices (major, minor) serving this pool's volumes, matched by the
    /// identity (device and inode) of each volume's image: one listing of the devices, one
    /// stat per volume.
    pub(crate) fn devices(&self) -> Result<HashSet<(u32, u32)>> {
        let loops = self.loops.list()?;
        if loops.is_empty() {
            return Ok(HashSet::new());
        }
        let by_file: HashMap<FileId, (u32, u32)> = loops
            .iter()
            .map(|l| (l.backing, (l.major, l.minor)))
            .collect();
        let mut ours = HashSet::new();
        for record in self.store.filter(|_| true) {
            if let Some(id) = self.backend.identity(&self.store.dir(&record.id))?
                && let Some(dev) = by_file.get(&id)
            {
                ours.insert(*dev);
            }
        }
        Ok(ours)
    }
}
