//! Moving a volume to another node, with its data and under the same volume id.
//!
//! The intent is an annotation on the claim, [`MOVE_TO`]: the node to move to. Kubernetes
//! holds all of it: the intent (the annotation), the commit (the PV's node affinity, which
//! the target patches under a resourceVersion precondition; KEP-5381, gate
//! `MutablePVNodeAffinity`) and the progress (the claim's [`MOVE_STATUS`] annotation and
//! events). Each node keeps only its own half of a move in its pool:
//! - the **target** ([`Arrivals`]) pulls a pre-copy while the application keeps running,
//!   then, once the volume is no longer in use on its node, the ranges changed since; it
//!   commits by patching the PV, then takes the copy into its store;
//! - the **source** ([`Departures`]) keeps a reflinked copy of the volume the pre-copy is
//!   read from (the base of the final delta), seals the volume for the final copy (no stage
//!   from then on), and retires its copy only when it sees the PV point elsewhere; when
//!   the intent is gone before the commit, it unseals and drops the copy.
//!
//! Every step is recorded before it is acted on and is idempotent, so either side killed at
//! any point resumes from its records and the cluster's objects: the PV's node affinity
//! decides which copy serves.

pub mod arrivals;
pub mod departures;
pub mod evacuation;
mod halves;

pub use arrivals::{Arrivals, ArrivalsRound, MoveFigures};
pub use departures::Departures;
pub use evacuation::{Evacuation, EvacuationRound};

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::VolumeRecord;

/// The claim annotation that asks for a move: the name of the node to move to.
pub const MOVE_TO: &str = "strata.csi.dev/move-to";
/// The Node annotation that asks for every volume of the node to move elsewhere.
pub const EVACUATE: &str = "strata.csi.dev/evacuate";
/// The claim annotation the target keeps the move's progress and outcome in.
pub const MOVE_STATUS: &str = "strata.csi.dev/move-status";
/// The pool folder holding each node's halves of moves (`in/`, `out/`).
pub const DIR: &str = "moves";
/// The largest volume record a peer may send.
const MAX_RECORD_BYTES: usize = 64 << 10;

/// A claim asking for its volume to move, as the target reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveIntent {
    pub namespace: String,
    pub claim: String,
    pub pv: String,
    pub volume_id: String,
    /// The node the PV is pinned to now.
    pub pv_node: Option<String>,
    /// The PV's resourceVersion when read: the commit's precondition.
    pub resource_version: String,
    /// The node the claim asks for.
    pub target: String,
    /// The claim's [`MOVE_STATUS`] as last written.
    pub status: Option<String>,
}

/// Where a volume stands in the cluster, as its source reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlacement {
    /// The node its PV is pinned to.
    pub pv_node: Option<String>,
    /// The node its claim asks to move to.
    pub move_to: Option<String>,
}

/// A claim of this driver's PV pinned to a node, as an evacuation reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedClaim {
    pub namespace: String,
    pub claim: String,
    pub volume_id: String,
    /// Its [`MOVE_TO`], if set.
    pub move_to: Option<String>,
    /// Its [`MOVE_STATUS`], if set.
    pub status: Option<String>,
}

/// The cluster as moves need it: narrow, so the fake and the real client agree.
pub trait MoveCluster: Send + Sync {
    /// Whether Node `node` asks to be evacuated ([`EVACUATE`] is `"true"`).
    fn evacuating(&self, node: &str) -> Result<bool>;
    /// The claims of this driver's PVs pinned to `node`.
    fn claims_on(&self, node: &str) -> Result<Vec<PinnedClaim>>;
    /// The free bytes of every node a volume may move to (schedulable, not being
    /// evacuated), as this driver's storage capacity objects record them.
    fn room(&self) -> Result<BTreeMap<String, u64>>;
    /// Sets a claim's [`MOVE_TO`] to `target`.
    fn ask_move(&self, namespace: &str, claim: &str, target: &str) -> Result<()>;
    /// The claims of this driver's PVs whose [`MOVE_TO`] names `target`.
    fn intents(&self, target: &str) -> Result<Vec<MoveIntent>>;
    /// Where volume `volume_id` stands; `None` when no PV of this driver has it.
    fn placement(&self, volume_id: &str) -> Result<Option<VolumePlacement>>;
    /// Whether PV `pv`'s node affinity may be changed (a dry run): FAILED_PRECONDITION,
    /// saying why, where the cluster refuses (the gate off).
    fn check_repin(&self, pv: &str, node: &str) -> Result<()>;
    /// Pins PV `pv` to `node`, if it is still at `resource_version` (ABORTED otherwise).
    fn repin(&self, pv: &str, resource_version: &str, node: &str) -> Result<()>;
    /// Writes a long step's progress into the claim's [`MOVE_STATUS`] (no event).
    fn progress(&self, namespace: &str, claim: &str, status: &str) -> Result<()>;
    /// Writes `status` into the claim's [`MOVE_STATUS`] and records it as an event
    /// (a warning when `warning`); `done` also removes [`MOVE_TO`].
    fn report(
        &self,
        namespace: &str,
        claim: &str,
        status: &str,
        warning: bool,
        done: bool,
    ) -> Result<()>;
}

/// A volume record as a peer sends it: the store's JSON.
pub fn record_to_wire(record: &VolumeRecord) -> Result<Vec<u8>> {
    crate::store::encode_record(record)
}

/// Reads a volume record a peer sent: bounded, of a version this build knows, naming the
/// volume asked for.
pub fn record_from_wire(bytes: &[u8], volume_id: &str) -> Result<VolumeRecord> {
    let wrong = |what: String| {
        Error::Internal(format!(
            "the node holding volume {volume_id} sent its record {what}: run the same Strata version on every node"
        ))
    };
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(wrong(format!("as {} bytes", bytes.len())));
    }
    let record: VolumeRecord = serde_json::from_slice(bytes)
        .map_err(|e| wrong(format!("in a form this version cannot read ({e})")))?;
    if record.version > crate::model::VOLUME_RECORD_VERSION {
        return Err(wrong(format!("at version {}", record.version)));
    }
    if record.id != volume_id {
        return Err(wrong("under another id".into()));
    }
    Ok(record)
}

/// A fresh id for one attempt at a move.
fn new_move_id() -> String {
    format!("move-{}", crate::ids::random_hex(8))
}

/// A PV of this driver and its claim, as the fake cluster holds them.
#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeClaim {
    pub namespace: String,
    pub claim: String,
    pub pv: String,
    pub pv_node: Option<String>,
    pub resource_version: u64,
    pub move_to: Option<String>,
    pub status: Option<String>,
}

/// The cluster in memory: claims and PVs by volume id, the gate, the events written, any
/// call made to fail.
#[cfg(any(test, feature = "fake"))]
#[derive(Default)]
pub struct FakeMoveCluster {
    pub claims: Mutex<BTreeMap<String, FakeClaim>>,
    /// The API server refuses changes of a PV's node affinity (the gate off).
    pub gate_off: std::sync::atomic::AtomicBool,
    /// Every report, as (claim, status, warning).
    pub events: Mutex<Vec<(String, String, bool)>>,
    /// The next calls fail with this (the API server unreachable).
    pub failing: Mutex<Option<Error>>,
    /// The nodes whose Node asks to be evacuated.
    pub evacuating: Mutex<Vec<String>>,
    /// Free bytes by node, as storage capacity objects say.
    pub room: Mutex<BTreeMap<String, u64>>,
    /// The next commit is refused as if another writer had changed the PV.
    pub conflict_next_repin: std::sync::atomic::AtomicBool,
    /// Reports that end a move are lost (the target killed right before them).
    pub drop_done_reports: std::sync::atomic::AtomicBool,
}

#[cfg(any(test, feature = "fake"))]
impl FakeMoveCluster {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, FakeClaim>>> {
        if let Some(e) = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(e);
        }
        Ok(self.claims.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds the claim `name` bound to a PV of `volume_id` pinned to `node`.
    pub fn add(&self, volume_id: &str, name: &str, node: &str) {
        self.claims.lock().unwrap().insert(
            volume_id.to_owned(),
            FakeClaim {
                namespace: "default".into(),
                claim: name.into(),
                pv: format!("pv-{name}"),
                pv_node: Some(node.into()),
                resource_version: 1,
                ..FakeClaim::default()
            },
        );
    }

    /// Sets or removes the claim's [`MOVE_TO`].
    pub fn ask(&self, volume_id: &str, target: Option<&str>) {
        let mut claims = self.claims.lock().unwrap();
        let c = claims.get_mut(volume_id).unwrap();
        c.move_to = target.map(str::to_owned);
    }

    /// The claim and PV of `volume_id`.
    pub fn claim(&self, volume_id: &str) -> FakeClaim {
        self.claims.lock().unwrap()[volume_id].clone()
    }
}

/// The fake claim `namespace/claim`, or NOT_FOUND.
#[cfg(any(test, feature = "fake"))]
fn claim_mut<'a>(
    claims: &'a mut BTreeMap<String, FakeClaim>,
    namespace: &str,
    claim: &str,
) -> Result<&'a mut FakeClaim> {
    claims
        .values_mut()
        .find(|c| c.namespace == namespace && c.claim == claim)
        .ok_or_else(|| Error::NotFound(format!("claim {claim} does not exist")))
}

#[cfg(any(test, feature = "fake"))]
impl MoveCluster for FakeMoveCluster {
    fn evacuating(&self, node: &str) -> Result<bool> {
        drop(self.lock()?);
        Ok(self.evacuating.lock().unwrap().iter().any(|n| n == node))
    }

    fn claims_on(&self, node: &str) -> Result<Vec<PinnedClaim>> {
        Ok(self
            .lock()?
            .iter()
            .filter(|(_, c)| c.pv_node.as_deref() == Some(node))
            .map(|(id, c)| PinnedClaim {
                namespace: c.namespace.clone(),
                claim: c.claim.clone(),
                volume_id: id.clone(),
                move_to: c.move_to.clone(),
                status: c.status.clone(),
            })
            .collect())
    }

    fn room(&self) -> Result<BTreeMap<String, u64>> {
        drop(self.lock()?);
        let evacuating = self.evacuating.lock().unwrap().clone();
        let mut room = self.room.lock().unwrap().clone();
        room.retain(|n, _| !evacuating.contains(n));
        Ok(room)
    }

    fn progress(&self, namespace: &str, claim: &str, status: &str) -> Result<()> {
        let mut claims = self.lock()?;
        claim_mut(&mut claims, namespace, claim)?.status = Some(status.to_owned());
        Ok(())
    }

    fn ask_move(&self, namespace: &str, claim: &str, target: &str) -> Result<()> {
        let mut claims = self.lock()?;
        let c = claim_mut(&mut claims, namespace, claim)?;
        c.move_to = Some(target.to_owned());
        Ok(())
    }

    fn intents(&self, target: &str) -> Result<Vec<MoveIntent>> {
        Ok(self
            .lock()?
            .iter()
            .filter(|(_, c)| c.move_to.as_deref() == Some(target))
            .map(|(id, c)| MoveIntent {
                namespace: c.namespace.clone(),
                claim: c.claim.clone(),
                pv: c.pv.clone(),
                volume_id: id.clone(),
                pv_node: c.pv_node.clone(),
                resource_version: c.resource_version.to_string(),
                target: target.to_owned(),
                status: c.status.clone(),
            })
            .collect())
    }

    fn placement(&self, volume_id: &str) -> Result<Option<VolumePlacement>> {
        Ok(self.lock()?.get(volume_id).map(|c| VolumePlacement {
            pv_node: c.pv_node.clone(),
            move_to: c.move_to.clone(),
        }))
    }

    fn check_repin(&self, pv: &str, _node: &str) -> Result<()> {
        drop(self.lock()?);
        if self.gate_off.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(format!(
                "the API server refuses to change PV {pv}'s node affinity (field is immutable): enable the MutablePVNodeAffinity feature gate (Kubernetes 1.35 or later), or snapshot and restore into a new claim on the target"
            )));
        }
        Ok(())
    }

    fn repin(&self, pv: &str, resource_version: &str, node: &str) -> Result<()> {
        self.check_repin(pv, node)?;
        let mut claims = self.lock()?;
        if self
            .conflict_next_repin
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            for c in claims.values_mut() {
                c.resource_version += 1;
            }
        }
        let c = claims
            .values_mut()
            .find(|c| c.pv == pv)
            .ok_or_else(|| Error::NotFound(format!("PV {pv} does not exist")))?;
        if c.resource_version.to_string() != resource_version {
            return Err(Error::Aborted(format!(
                "PV {pv} changed since it was read; retry"
            )));
        }
        c.pv_node = Some(node.to_owned());
        c.resource_version += 1;
        Ok(())
    }

    fn report(
        &self,
        namespace: &str,
        claim: &str,
        status: &str,
        warning: bool,
        done: bool,
    ) -> Result<()> {
        if done
            && self
                .drop_done_reports
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let mut claims = self.lock()?;
        let c = claim_mut(&mut claims, namespace, claim)?;
        c.status = Some(status.to_owned());
        if done {
            c.move_to = None;
        }
        self.events
            .lock()
            .unwrap()
            .push((claim.to_owned(), status.to_owned(), warning));
        Ok(())
    }
}

#[cfg(any(test, feature = "fake"))]
use std::sync::Mutex;

#[cfg(test)]
mod tests;
