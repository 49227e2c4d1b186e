//! The source's half of moves: for each volume of this node that another node is pulling,
//! a reflinked copy taken at the pre-copy (what the pre-copy reads, and the base of the
//! final delta) and whether the volume is sealed (no stage since the final copy began).
//!
//! In the pool, `moves/out/<volume>.json` records a departure before anything is made for
//! it, `moves/out/<volume>/` is its copy once complete (`.partial-<volume>` while it is
//! made). Startup drops partial copies and copies without a record, and loads the rest.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::halves::{Half, Halves};
use super::{MoveCluster, VolumePlacement};
use crate::backend::Backend;
use crate::durable::sync_dir;
use crate::error::{Error, IoContext, Result};
use crate::fault::FaultPoints;
use crate::freezer::Freezer;
use crate::inflight::InFlight;
use crate::model::{CopyMethod, VolumeRecord};
use crate::peer::{Departing, DepartureRead, MoveStep, SourceInfo};
use crate::snapshot_metadata::changed_ranges;
use crate::store::remove_object_dir;
use crate::volumes::Volumes;

const VERSION: u32 = 1;
/// The most separate ranges a final delta may list (16 bytes each in memory).
const MAX_RANGES: usize = 1 << 20;
const PARTIAL: &str = ".partial-";

/// A departure as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Departure {
    version: u32,
    volume_id: String,
    move_id: String,
    target: String,
    /// The volume is sealed: the final copy began, so it is not staged here again.
    sealed: bool,
    /// The copy shares the volume's extents (reflink), so the delta compares extent maps.
    #[serde(default)]
    shared: bool,
}

impl Half for Departure {
    const KIND: &'static str = "a departure";
    const VERSION: u32 = VERSION;
    fn volume_id(&self) -> &str {
        &self.volume_id
    }
    fn version(&self) -> u32 {
        self.version
    }
}

/// What a round of [`Departures::reconcile`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeparturesRound {
    /// Volumes retired here: their PV points to the node they moved to.
    pub retired: Vec<String>,
    /// Departures dropped: the intent was withdrawn, or the volume or its PV is gone.
    pub cancelled: Vec<String>,
}

/// This node's volumes being moved elsewhere.
pub struct Departures {
    node_id: String,
    volumes: Arc<Volumes>,
    backend: Arc<dyn Backend>,
    freezer: Arc<Freezer>,
    halves: Halves,
    /// One step at a time per volume.
    steps: Arc<InFlight>,
    state: Mutex<BTreeMap<String, Departure>>,
    crash: FaultPoints,
}

impl Departures {
    /// Loads the departures a previous run recorded, dropping what a crash left half made.
    pub fn open(
        node_id: &str,
        pool: &std::path::Path,
        volumes: Arc<Volumes>,
        backend: Arc<dyn Backend>,
        freezer: Arc<Freezer>,
        crash: FaultPoints,
    ) -> Result<Self> {
        let halves = Halves::open(pool, "out")?;
        let found = halves.load::<Departure>()?;
        for name in &found.others {
            if name.starts_with(PARTIAL) || !found.records.contains_key(name) {
                tracing::info!(copy = %name, "removing the copy of a move a previous run left");
                remove_object_dir(&halves.dir().join(name), backend.as_ref())?;
            }
        }
        let state = found.records;
        // A sealed volume whose record is gone (deleted) needs no departure either.
        let gone: Vec<String> = state
            .keys()
            .filter(|id| volumes.store.get(id).is_none())
            .cloned()
            .collect();
        let departures = Departures {
            node_id: node_id.to_owned(),
            volumes,
            backend,
            freezer,
            halves,
            steps: InFlight::new(),
            state: Mutex::new(state),
            crash,
        };
        for id in gone {
            departures.drop_departure(&id)?;
        }
        Ok(departures)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Departure>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node a volume is sealed for, if it is: it must not be staged here.
    pub fn sealed(&self, volume_id: &str) -> Option<String> {
        self.lock()
            .get(volume_id)
            .filter(|d| d.sealed)
            .map(|d| d.target.clone())
    }

    /// The volumes departing now, with their targets.
    pub fn departing(&self) -> Vec<(String, String)> {
        self.lock()
            .values()
            .map(|d| (d.volume_id.clone(), d.target.clone()))
            .collect()
    }

    fn copy_dir(&self, volume_id: &str) -> PathBuf {
        self.halves.dir().join(volume_id)
    }

    fn partial_dir(&self, volume_id: &str) -> PathBuf {
        self.halves.dir().join(format!("{PARTIAL}{volume_id}"))
    }

    fn record(&self, d: &Departure) -> Result<()> {
        self.halves.write(d)?;
        self.lock().insert(d.volume_id.clone(), d.clone());
        Ok(())
    }

    /// Drops a departure: its copy, then its record. Idempotent.
    fn drop_departure(&self, volume_id: &str) -> Result<()> {
        remove_object_dir(&self.copy_dir(volume_id), self.backend.as_ref())?;
        remove_object_dir(&self.partial_dir(volume_id), self.backend.as_ref())?;
        self.halves.remove(volume_id)?;
        self.lock().remove(volume_id);
        Ok(())
    }

    fn info(&self, record: &VolumeRecord) -> SourceInfo {
        SourceInfo {
            size_bytes: record.capacity_bytes,
            format: record.format.clone(),
            backend: self.backend.kind().to_owned(),
            encryption: record.encryption.clone(),
        }
    }

    /// The pre-copy: the volume's copy (made now unless this move has it already), opened.
    fn precopy(&self, volume_id: &str, move_id: &str, target: &str) -> Result<DepartureRead> {
        let record = self.volumes.get(volume_id)?;
        if !self.backend.block_layout() {
            // The final copy sends what changed since the pre-copy, which only a block
            // layout tells.
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is on the {} backend, whose volumes do not move between nodes (only image volumes do): snapshot it and restore the snapshot on node {target}",
                self.backend.kind()
            )));
        }
        let existing = self.lock().get(volume_id).cloned();
        let sealed = match &existing {
            Some(d) if d.move_id == move_id && self.copy_dir(volume_id).exists() => {
                return self.open_copy(record);
            }
            Some(d) if d.sealed && d.target != target => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is sealed for its move to node {}; withdraw that move first",
                    d.target
                )));
            }
            // The same target starting again keeps the seal: the volume was not in use.
            Some(d) => d.sealed,
            None => false,
        };
        if existing.is_some() {
            self.drop_departure(volume_id)?;
        }
        let mut departure = Departure {
            version: VERSION,
            volume_id: volume_id.to_owned(),
            move_id: move_id.to_owned(),
            target: target.to_owned(),
            sealed,
            shared: false,
        };
        self.record(&departure)?;
        let partial = self.partial_dir(volume_id);
        fs::create_dir(&partial).ctx(|| format!("create {}", partial.display()))?;
        let made = {
            let _guard = self.volumes.guard_shared(volume_id)?;
            let dir = self.volumes.dir(volume_id);
            self.freezer
                .freeze_if_mounted(volume_id, &dir)
                .and_then(|frozen| {
                    let copied =
                        self.backend
                            .copy_from(&dir, &partial, record.capacity_bytes, true);
                    drop(frozen);
                    copied
                })
        };
        let method = match made {
            Ok(method) => method,
            Err(e) => {
                let _ = remove_object_dir(&partial, self.backend.as_ref());
                return Err(e);
            }
        };
        departure.shared = method == CopyMethod::Reflink;
        self.record(&departure)?;
        let copy = self.copy_dir(volume_id);
        fs::rename(&partial, &copy).ctx(|| format!("commit {}", copy.display()))?;
        sync_dir(self.halves.dir())?;
        self.crash.reach("move:after-base");
        tracing::info!(
            volume_id,
            move_id,
            target,
            shared = departure.shared,
            "pre-copy of a move ready"
        );
        self.open_copy(record)
    }

    fn open_copy(&self, record: VolumeRecord) -> Result<DepartureRead> {
        let file = self.backend.open_data(&self.copy_dir(&record.id))?;
        Ok(DepartureRead {
            file,
            source: self.info(&record),
            ranges: None,
            record,
        })
    }

    /// The final copy: the volume sealed (FAILED_PRECONDITION while it is in use), and
    /// the ranges that changed since the pre-copy.
    fn final_copy(&self, volume_id: &str, move_id: &str) -> Result<DepartureRead> {
        let Some(mut departure) = self
            .lock()
            .get(volume_id)
            .filter(|d| d.move_id == move_id)
            .cloned()
        else {
            return Err(Error::NotFound(format!(
                "move {move_id} of volume {volume_id} has no pre-copy on node {}: start it again",
                self.node_id
            )));
        };
        let _guard = self.volumes.guard(volume_id)?;
        let record = self.volumes.get(volume_id)?;
        let dir = self.volumes.dir(volume_id);
        if !departure.sealed {
            if let Some(att) = self.backend.attachment(&dir)? {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is in use on node {} ({att}); the move's final copy waits until it is unpublished and unstaged (scale its workload down, or drain the node)",
                    self.node_id
                )));
            }
            departure.sealed = true;
            self.record(&departure)?;
            tracing::info!(volume_id, move_id, target = %departure.target, "volume sealed for its move");
            self.crash.reach("move:after-seal");
        }
        let live = self.backend.open_data(&dir)?;
        let base = self.backend.open_data(&self.copy_dir(volume_id))?;
        let ranges = changed_ranges(
            &base,
            &live,
            departure.shared,
            record.capacity_bytes,
            MAX_RANGES,
        )?;
        tracing::info!(
            volume_id,
            move_id,
            ranges = ranges.len(),
            bytes = ranges.iter().map(|r| r.length).sum::<u64>(),
            "final copy of a move opened"
        );
        Ok(DepartureRead {
            file: live,
            source: self.info(&record),
            ranges: Some(ranges),
            record,
        })
    }

    /// Acts on what the cluster says of each departure: the PV pinned to the target
    /// retires the volume here; an intent withdrawn (or a PV gone) before that drops the
    /// departure and unseals the volume. A cluster that cannot be read changes nothing.
    pub fn reconcile(&self, cluster: &dyn MoveCluster) -> Result<DeparturesRound> {
        let mut round = DeparturesRound::default();
        let departing: Vec<Departure> = self.lock().values().cloned().collect();
        for d in departing {
            let id = &d.volume_id;
            let _step = match self.steps.acquire(id.clone()) {
                Ok(step) => step,
                Err(_) => continue,
            };
            if self.volumes.store.get(id).is_none() {
                self.drop_departure(id)?;
                round.cancelled.push(id.clone());
                continue;
            }
            match cluster.placement(id)? {
                Some(VolumePlacement {
                    pv_node: Some(node),
                    ..
                }) if node == d.target => {
                    self.retire(&d)?;
                    round.retired.push(id.clone());
                }
                Some(VolumePlacement { move_to, .. })
                    if move_to.as_deref() == Some(d.target.as_str()) => {}
                _ => {
                    tracing::info!(volume_id = %id, target = %d.target, "move withdrawn before its commit; the volume stays here");
                    self.drop_departure(id)?;
                    round.cancelled.push(id.clone());
                }
            }
        }
        Ok(round)
    }

    /// The volume is served by the node it moved to: this node's copy goes.
    fn retire(&self, d: &Departure) -> Result<()> {
        let id = &d.volume_id;
        let _guard = self.volumes.guard(id)?;
        self.crash.reach("move:before-retire");
        if let Some(doomed) = self.volumes.store.retire(id)? {
            remove_object_dir(&doomed, self.backend.as_ref())?;
        }
        self.drop_departure(id)?;
        tracing::info!(volume_id = %id, to_node = %d.target, "volume retired here: its PV points to the node it moved to");
        Ok(())
    }
}

impl Departing for Departures {
    fn open_departure(
        &self,
        step: MoveStep,
        volume_id: &str,
        move_id: &str,
        target: &str,
    ) -> Result<DepartureRead> {
        crate::validate::required_str("volume_id", volume_id)?;
        crate::validate::required_str("move_id", move_id)?;
        let _step = self.steps.acquire(volume_id.to_owned())?;
        match step {
            MoveStep::Precopy => self.precopy(volume_id, move_id, target),
            MoveStep::Final => self.final_copy(volume_id, move_id),
            MoveStep::Cancel => Err(Error::InvalidArgument("a cancel opens nothing".to_owned())),
        }
    }

    fn cancel_departure(&self, volume_id: &str, move_id: &str) -> Result<()> {
        crate::validate::required_str("volume_id", volume_id)?;
        let _step = self.steps.acquire(volume_id.to_owned())?;
        let matches = self
            .lock()
            .get(volume_id)
            .is_some_and(|d| move_id.is_empty() || d.move_id == move_id);
        if matches {
            self.drop_departure(volume_id)?;
            tracing::info!(
                volume_id,
                move_id,
                "move cancelled by its target; the volume stays here"
            );
        }
        Ok(())
    }
}
