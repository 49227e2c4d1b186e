//! The target's half of moves: for each claim whose [`super::MOVE_TO`] names this node, a
//! pre-copy pulled while the volume stays in use on its node, the ranges changed since
//! pulled once it is not, the PV pinned here, then the copy taken into the store under the
//! volume's own id.
//!
//! In the pool, `moves/in/<volume>/` holds the copy's data and `moves/in/<volume>.json`
//! what has been completed (pre-copy, final copy); neither is a volume of this node until
//! the PV says so. Startup drops data without a record; everything else resumes.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::halves::{Half, Halves};
use super::{MoveCluster, MoveIntent, new_move_id};
use crate::backend::Backend;
use crate::error::{Error, IoContext, Result};
use crate::fault::FaultPoints;
use crate::model::{ContentSource, VolumeRecord};
use crate::os::extents::allocated_bytes;
use crate::peer::{CopyInto, MoveStep, Peers, RemoteCopies};
use crate::store::remove_object_dir;
use crate::volumes::Volumes;

const VERSION: u32 = 1;

/// How far an arrival has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// The pre-copy is complete.
    Precopied,
    /// The final copy is complete: the data is the volume's, only the commit is left.
    Complete,
}

impl Half for Arrival {
    const KIND: &'static str = "an arrival";
    const VERSION: u32 = VERSION;
    fn volume_id(&self) -> &str {
        &self.volume_id
    }
    fn version(&self) -> u32 {
        self.version
    }
}

/// An arrival as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Arrival {
    version: u32,
    move_id: String,
    volume_id: String,
    source_node: String,
    pv: String,
    namespace: String,
    claim: String,
    phase: Phase,
    /// The volume's record as its node sent it with the last copy.
    record: VolumeRecord,
}

/// What a round of [`Arrivals::round`] did, by volume id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ArrivalsRound {
    pub precopied: Vec<String>,
    /// Waiting for the volume to be out of use on its node.
    pub waiting: Vec<String>,
    pub moved: Vec<String>,
    pub cancelled: Vec<String>,
    /// Refused or failed, with the reason reported on the claim.
    pub failed: Vec<(String, String)>,
}

impl ArrivalsRound {
    fn merge(&mut self, other: ArrivalsRound) {
        self.precopied.extend(other.precopied);
        self.waiting.extend(other.waiting);
        self.moved.extend(other.moved);
        self.cancelled.extend(other.cancelled);
        self.failed.extend(other.failed);
    }
}

/// Moves to one node that run at once.
pub const PARALLEL: usize = 2;

/// Volumes moving to this node.
pub struct Arrivals {
    node_id: String,
    peers: Arc<dyn Peers>,
    remote: Arc<RemoteCopies>,
    volumes: Arc<Volumes>,
    backend: Arc<dyn Backend>,
    halves: Halves,
    state: Mutex<BTreeMap<String, Arrival>>,
    figures: MoveFigures,
    /// How often a pre-copy's progress is shown, in milliseconds.
    progress_millis: AtomicU64,
    crash: FaultPoints,
}

/// Counters of moves to this node since startup, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct MoveFigures {
    pub moved: AtomicU64,
    pub failed: AtomicU64,
}

impl Arrivals {
    /// Loads the arrivals a previous run recorded; data without a record (a pre-copy cut
    /// short) is removed, to be pulled again.
    pub fn open(
        node_id: &str,
        pool: &std::path::Path,
        peers: Arc<dyn Peers>,
        remote: Arc<RemoteCopies>,
        volumes: Arc<Volumes>,
        backend: Arc<dyn Backend>,
        crash: FaultPoints,
    ) -> Result<Self> {
        let halves = Halves::open(pool, "in")?;
        let found = halves.load::<Arrival>()?;
        for name in found.others {
            if !found.records.contains_key(&name) {
                tracing::info!(copy = %name, "removing a move's copy cut short by a previous run");
                remove_object_dir(&halves.dir().join(&name), backend.as_ref())?;
            }
        }
        Ok(Arrivals {
            node_id: node_id.to_owned(),
            peers,
            remote,
            volumes,
            backend,
            halves,
            state: Mutex::new(found.records),
            figures: MoveFigures::default(),
            progress_millis: AtomicU64::new(10_000),
            crash,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arrival>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn figures(&self) -> &MoveFigures {
        &self.figures
    }

    /// The volumes arriving now.
    pub fn arriving(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn data_dir(&self, volume_id: &str) -> PathBuf {
        self.halves.dir().join(volume_id)
    }

    fn record(&self, a: &Arrival) -> Result<()> {
        self.halves.write(a)?;
        self.lock().insert(a.volume_id.clone(), a.clone());
        Ok(())
    }

    /// Drops an arrival: its record first (so a crash leaves data startup removes), then
    /// its data. Idempotent.
    fn drop_arrival(&self, volume_id: &str) -> Result<()> {
        self.halves.remove(volume_id)?;
        self.lock().remove(volume_id);
        remove_object_dir(&self.data_dir(volume_id), self.backend.as_ref())
    }

    /// One pass over the moves to this node: each advances as far as it can now. A move
    /// that fails is reported on its claim and tried again next round.
    pub fn round(&self, cluster: &dyn MoveCluster) -> Result<ArrivalsRound> {
        let mut round = ArrivalsRound::default();
        let intents = cluster.intents(&self.node_id)?;
        // Arrivals whose intent is gone: committed (the PV says here) or withdrawn.
        let orphans: Vec<Arrival> = self
            .lock()
            .values()
            .filter(|a| !intents.iter().any(|i| i.volume_id == a.volume_id))
            .cloned()
            .collect();
        for a in orphans {
            let here = cluster
                .placement(&a.volume_id)?
                .and_then(|p| p.pv_node)
                .is_some_and(|n| n == self.node_id);
            if here && a.phase == Phase::Complete {
                self.adopt(&a)?;
                round.moved.push(a.volume_id.clone());
            } else {
                self.cancel(&a);
                round.cancelled.push(a.volume_id.clone());
            }
        }
        // A few moves at once, each on its own thread (a pre-copy may take minutes).
        for batch in intents.chunks(PARALLEL) {
            let rounds: Vec<ArrivalsRound> = std::thread::scope(|scope| {
                let running: Vec<_> = batch
                    .iter()
                    .map(|intent| scope.spawn(move || self.advance_reported(intent, cluster)))
                    .collect();
                running
                    .into_iter()
                    .map(|t| t.join().unwrap_or_default())
                    .collect()
            });
            for r in rounds {
                round.merge(r);
            }
        }
        Ok(round)
    }

    /// Advances one move; a failure is reported on its claim.
    fn advance_reported(&self, intent: &MoveIntent, cluster: &dyn MoveCluster) -> ArrivalsRound {
        let mut round = ArrivalsRound::default();
        if let Err(e) = self.advance(intent, cluster, &mut round) {
            let why = e.to_string();
            tracing::warn!(volume_id = %intent.volume_id, claim = %intent.claim, error = %why, "move failed; retried next round");
            let status = format!("Failed: {why}");
            self.report(cluster, intent, &status, true, false);
            self.figures.failed.fetch_add(1, Ordering::Relaxed);
            round.failed.push((intent.volume_id.clone(), why));
        }
        round
    }

    /// Reports on the claim when the status changed (a failed report is only logged: the
    /// next round writes it again).
    fn report(
        &self,
        cluster: &dyn MoveCluster,
        intent: &MoveIntent,
        status: &str,
        warning: bool,
        done: bool,
    ) {
        if !done && intent.status.as_deref() == Some(status) {
            return;
        }
        if let Err(e) = cluster.report(&intent.namespace, &intent.claim, status, warning, done) {
            tracing::warn!(claim = %intent.claim, error = %e, "could not report a move's progress");
        }
    }

    fn advance(
        &self,
        intent: &MoveIntent,
        cluster: &dyn MoveCluster,
        round: &mut ArrivalsRound,
    ) -> Result<()> {
        let id = &intent.volume_id;
        let existing = self.lock().get(id).cloned();
        if intent.pv_node.as_deref() == Some(self.node_id.as_str()) {
            // Committed: the copy is taken in (again, after a crash), or was already.
            if let Some(a) = existing.filter(|a| a.phase == Phase::Complete) {
                self.adopt(&a)?;
            }
            if self.volumes.store.get(id).is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "the PV {} is pinned to node {} but that node has no copy of volume {id}",
                    intent.pv, self.node_id
                )));
            }
            let status = format!("Moved to node {}", self.node_id);
            self.report(cluster, intent, &status, false, true);
            round.moved.push(id.clone());
            return Ok(());
        }
        let Some(source) = intent.pv_node.clone() else {
            return Err(Error::FailedPrecondition(format!(
                "the PV {} of volume {id} is pinned to no node",
                intent.pv
            )));
        };
        let mut arrival = match existing {
            Some(a) if a.source_node == source => a,
            stale => {
                if let Some(a) = stale {
                    // The PV now names another node than the pre-copy came from.
                    self.cancel(&a);
                }
                if let Err(e) = cluster.check_repin(&intent.pv, &self.node_id) {
                    let status = format!("Refused: {e}");
                    self.report(cluster, intent, &status, true, false);
                    round.failed.push((id.clone(), e.to_string()));
                    return Ok(());
                }
                let status =
                    format!("Copying from node {source} (pre-copy, the volume stays in use)");
                self.report(cluster, intent, &status, false, false);
                let a = self.precopy(intent, &source, cluster)?;
                round.precopied.push(id.clone());
                a
            }
        };
        if arrival.phase == Phase::Precopied {
            match self.final_copy(&mut arrival) {
                Ok(()) => {}
                Err(Error::FailedPrecondition(why)) => {
                    let status = format!("Waiting: {why}");
                    self.report(cluster, intent, &status, false, false);
                    round.waiting.push(id.clone());
                    return Ok(());
                }
                Err(Error::NotFound(why)) => {
                    // The source lost the pre-copy's base (or the volume): start again.
                    self.drop_arrival(id)?;
                    return Err(Error::Unavailable(why));
                }
                Err(e) => return Err(e),
            }
        }
        // The commit: the PV pinned here, if nobody changed it since it was read.
        cluster.repin(&intent.pv, &intent.resource_version, &self.node_id)?;
        tracing::info!(volume_id = %id, pv = %intent.pv, from_node = %source, to_node = %self.node_id, "move committed: the PV is pinned here");
        self.crash.reach("move:after-repin");
        self.adopt(&arrival)?;
        let status = format!("Moved from node {source} to node {}", self.node_id);
        self.report(cluster, intent, &status, false, true);
        round.moved.push(id.clone());
        Ok(())
    }

    /// Pulls the pre-copy into fresh data here and records it.
    fn precopy(
        &self,
        intent: &MoveIntent,
        source: &str,
        cluster: &dyn MoveCluster,
    ) -> Result<Arrival> {
        let id = &intent.volume_id;
        let move_id = new_move_id();
        let dir = self.data_dir(id);
        remove_object_dir(&dir, self.backend.as_ref())?;
        let out = self
            .peers
            .move_out(source, MoveStep::Precopy, id, &move_id)?;
        let (Some(read), Some(record)) = (out.read, out.record) else {
            return Err(Error::Internal(format!(
                "node {source} answered the pre-copy of volume {id} without a read: run the same Strata version on every node"
            )));
        };
        let capacity = record.capacity_bytes;
        let free = self.backend.pool_usage()?.available_bytes;
        if capacity > free {
            let _ = self.peers.release(source, &read.read_id);
            let _ = self.peers.move_out(source, MoveStep::Cancel, id, &move_id);
            return Err(Error::ResourceExhausted(format!(
                "node {} has {free} bytes free, less than volume {id}'s {capacity} bytes: free space there or move it elsewhere",
                self.node_id
            )));
        }
        fs::create_dir(&dir).ctx(|| format!("create {}", dir.display()))?;
        let what = ContentSource::Volume(id.clone());
        let total = read.allocated_bytes;
        let pulled = self.backend.import(&dir, capacity).and_then(|file| {
            let watched = file.try_clone().ctx(|| "open the copy for its progress")?;
            let (done, finished) = std::sync::mpsc::channel::<()>();
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    self.show_progress(cluster, intent, source, &watched, total, finished)
                });
                let pulled = self.remote.pull_opened(
                    source,
                    &what,
                    Ok(read),
                    CopyInto::Blocks(&file),
                    capacity,
                );
                drop(done);
                pulled
            })
        });
        if let Err(e) = pulled {
            let _ = remove_object_dir(&dir, self.backend.as_ref());
            return Err(e);
        }
        let arrival = Arrival {
            version: VERSION,
            move_id,
            volume_id: id.clone(),
            source_node: source.to_owned(),
            pv: intent.pv.clone(),
            namespace: intent.namespace.clone(),
            claim: intent.claim.clone(),
            phase: Phase::Precopied,
            record,
        };
        self.record(&arrival)?;
        tracing::info!(volume_id = %id, from_node = source, move_id = %arrival.move_id, "pre-copy of a move pulled");
        self.crash.reach("move:after-precopy");
        Ok(arrival)
    }

    /// Writes the pre-copy's progress into the claim every progress period (the bytes
    /// allocated in the copy so far, of the source's), until `finished` says it is over.
    fn show_progress(
        &self,
        cluster: &dyn MoveCluster,
        intent: &MoveIntent,
        source: &str,
        copy: &std::fs::File,
        total: u64,
        finished: std::sync::mpsc::Receiver<()>,
    ) {
        let period = Duration::from_millis(self.progress_millis.load(Ordering::Relaxed));
        while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(period) {
            let copied = allocated_bytes(copy).unwrap_or(0).min(total);
            let status = format!(
                "Copying from node {source} (pre-copy, the volume stays in use): {} of {} MiB",
                copied >> 20,
                total.div_ceil(1 << 20)
            );
            if let Err(e) = cluster.progress(&intent.namespace, &intent.claim, &status) {
                tracing::warn!(claim = %intent.claim, error = %e, "could not show a move's progress");
            }
        }
    }

    /// How often a pre-copy's progress is written into its claim (10 s by default).
    pub fn set_progress_period(&self, period: Duration) {
        self.progress_millis
            .store(period.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Pulls what changed since the pre-copy, once the source has sealed the volume.
    fn final_copy(&self, arrival: &mut Arrival) -> Result<()> {
        let id = arrival.volume_id.clone();
        let source = arrival.source_node.clone();
        let out = self
            .peers
            .move_out(&source, MoveStep::Final, &id, &arrival.move_id)?;
        let (Some(read), Some(record)) = (out.read, out.record) else {
            return Err(Error::Internal(format!(
                "node {source} answered the final copy of volume {id} without a read: run the same Strata version on every node"
            )));
        };
        let capacity = record.capacity_bytes.max(arrival.record.capacity_bytes);
        let what = ContentSource::Volume(id.clone());
        self.backend
            .reopen_import(&self.data_dir(&id), capacity)
            .and_then(|file| {
                self.remote
                    .pull_opened(&source, &what, Ok(read), CopyInto::Blocks(&file), capacity)
            })?;
        arrival.phase = Phase::Complete;
        arrival.record = record;
        self.record(arrival)?;
        tracing::info!(volume_id = %id, from_node = %source, "final copy of a move pulled");
        self.crash.reach("move:after-final");
        Ok(())
    }

    /// Takes a complete copy into the store under the volume's id: this node serves it.
    fn adopt(&self, arrival: &Arrival) -> Result<()> {
        let mut record = arrival.record.clone();
        // Cgroup rules and published groups were the source node's.
        record.throttled.clear();
        record.mount_group_current = false;
        self.volumes
            .store
            .adopt(&self.data_dir(&arrival.volume_id), record)?;
        self.drop_arrival(&arrival.volume_id)?;
        self.figures.moved.fetch_add(1, Ordering::Relaxed);
        tracing::info!(volume_id = %arrival.volume_id, from_node = %arrival.source_node, "moved volume taken in: served here");
        Ok(())
    }

    /// Drops an arrival whose move was withdrawn, and tells its source (which also sees
    /// the intent gone by itself, so a source it cannot reach now is fine).
    fn cancel(&self, arrival: &Arrival) {
        let id = &arrival.volume_id;
        if let Err(e) =
            self.peers
                .move_out(&arrival.source_node, MoveStep::Cancel, id, &arrival.move_id)
        {
            tracing::warn!(volume_id = %id, node = %arrival.source_node, error = %e, "could not tell the source a move was withdrawn; it sees that itself");
        }
        match self.drop_arrival(id) {
            Ok(()) => tracing::info!(volume_id = %id, "move withdrawn: its copy here is dropped"),
            Err(e) => {
                tracing::warn!(volume_id = %id, error = %e, "could not drop a withdrawn move's copy; retried next round")
            }
        }
    }
}
