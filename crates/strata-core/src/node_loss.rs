//! A node that is gone for good: what was only there is released, so that nothing waits
//! forever for a node that will not come back.
//!
//! Every Strata puts [`FINALIZER`] on its own Node object, so that deleting a Node (never a
//! NotReady one: only an explicit delete says it is gone) waits for this. One Strata at a
//! time, the holder of a Lease, acts on each Node being deleted that still carries it:
//! - each of this driver's PVs pinned to the node, by its StorageClass's `onNodeLoss`:
//!   `Delete` deletes the claim (its owner, a StatefulSet, makes a new one, provisioned on a
//!   node that exists) and releases the PV (its finalizers, which only the lost node's
//!   provisioner would have removed, then the PV itself); `Retain` (the default) keeps both
//!   and reports, except a PV already being deleted, which is released;
//! - each VolumeSnapshotContent the node's snapshotter managed: released when it is being
//!   deleted, reported otherwise (its data was on the node);
//! - then the Node's finalizer goes, and the Node with it.
//!
//! Each step is idempotent and the finalizer goes last, so a janitor that dies part-way is
//! simply followed by the next Lease holder, which does the rest. Everything done is logged
//! and recorded as an event. Cluster state is read from the API server each round; nothing
//! is kept between rounds.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};

/// The finalizer each Strata keeps on its Node.
pub const FINALIZER: &str = "strata.csi.dev/node";
/// The StorageClass parameter that says what happens to a lost node's volumes.
pub const PARAMETER: &str = "onNodeLoss";
/// The Lease the janitors elect one of them with.
pub const LEASE: &str = "strata-node-loss";
/// How long a Lease holder keeps it without renewing.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);

/// What happens to the volumes of a node that is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnNodeLoss {
    /// Keep the claim and the PV; report.
    #[default]
    Retain,
    /// Delete the claim so that its owner makes a new one elsewhere; release the PV.
    Delete,
}

impl OnNodeLoss {
    /// The policy a StorageClass's parameters ask for.
    pub fn from_parameters(parameters: &BTreeMap<String, String>) -> Result<OnNodeLoss> {
        match parameters.get(PARAMETER).map(String::as_str) {
            None | Some("Retain") => Ok(OnNodeLoss::Retain),
            Some("Delete") => Ok(OnNodeLoss::Delete),
            Some(_) => Err(Error::InvalidArgument(format!(
                "parameter {PARAMETER:?} must be \"Retain\" or \"Delete\""
            ))),
        }
    }
}

/// A PersistentVolume of this driver pinned to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedVolume {
    pub pv: String,
    /// The claim bound to it (namespace, name).
    pub claim: Option<(String, String)>,
    /// That claim's uid, as the PV's claimRef records it: a new claim of the same name (its
    /// owner made one) is another claim.
    pub claim_uid: Option<String>,
    /// Its StorageClass's policy; a class that is gone or says nothing: Retain.
    pub policy: OnNodeLoss,
    /// The PV is being deleted already.
    pub deleting: bool,
}

/// A VolumeSnapshotContent of this driver that a node's snapshotter managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContent {
    pub name: String,
    pub deleting: bool,
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    Claim { namespace: String, name: String },
}

/// The cluster as the janitor needs it: narrow, so the fake and the real client agree.
pub trait NodeLossCluster: Send + Sync {
    /// Puts [`FINALIZER`] on Node `node` (nothing when it is there).
    fn protect_node(&self, node: &str) -> Result<()>;
    /// The Nodes being deleted that still carry [`FINALIZER`].
    fn deleted_nodes(&self) -> Result<Vec<String>>;
    /// Takes the Lease [`LEASE`] for `holder`, or renews it; whether `holder` holds it now.
    /// A Lease another holder renewed within `duration` is not taken.
    fn hold_lease(&self, holder: &str, duration: Duration) -> Result<bool>;
    /// This driver's PVs pinned to `node`.
    fn volumes_on(&self, node: &str) -> Result<Vec<PinnedVolume>>;
    /// Deletes a claim if it is still the one of uid `uid` (when given); whether it did.
    /// Gone already, or replaced by a new claim of that name: nothing is deleted, fine.
    fn delete_claim(&self, namespace: &str, name: &str, uid: Option<&str>) -> Result<bool>;
    /// Removes PV `pv`'s finalizers and deletes it (gone already: fine).
    fn release_volume(&self, pv: &str) -> Result<()>;
    /// This driver's VolumeSnapshotContents managed by `node`.
    fn contents_of(&self, node: &str) -> Result<Vec<ManagedContent>>;
    /// Removes a VolumeSnapshotContent's finalizers (gone already: fine).
    fn release_content(&self, name: &str) -> Result<()>;
    /// Removes [`FINALIZER`] from Node `node`.
    fn release_node(&self, node: &str) -> Result<()>;
    /// Records a warning event about `subject`.
    fn event(&self, subject: &Subject, reason: &str, message: &str) -> Result<()>;
}

/// What one round did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    pub leader: bool,
    pub nodes_released: Vec<String>,
    pub claims_deleted: Vec<(String, String)>,
    pub volumes_released: Vec<String>,
    pub volumes_reported: Vec<String>,
    pub contents_released: Vec<String>,
    pub contents_reported: Vec<String>,
}

pub struct NodeLoss {
    cluster: std::sync::Arc<dyn NodeLossCluster>,
    /// This node: the Lease holder's name, and a node never handled as lost by itself.
    node_id: String,
}

impl NodeLoss {
    pub fn new(cluster: std::sync::Arc<dyn NodeLossCluster>, node_id: &str) -> Self {
        NodeLoss {
            cluster,
            node_id: node_id.to_owned(),
        }
    }

    /// Puts the finalizer on this node's Node (at startup).
    pub fn protect(&self) -> Result<()> {
        self.cluster.protect_node(&self.node_id)
    }

    /// One round: if this Strata holds the Lease, every deleted Node is handled.
    pub fn round(&self) -> Result<Round> {
        let mut round = Round::default();
        if !self.cluster.hold_lease(&self.node_id, LEASE_DURATION)? {
            return Ok(round);
        }
        round.leader = true;
        for node in self.cluster.deleted_nodes()? {
            if node == self.node_id {
                // Its own Node deleted while it runs: it is still here; the next holder (on
                // another node) releases it once this one is gone.
                continue;
            }
            self.release(&node, &mut round)?;
        }
        Ok(round)
    }

    fn release(&self, node: &str, round: &mut Round) -> Result<()> {
        tracing::warn!(
            node,
            "a Node with Strata's finalizer is being deleted: releasing what only it held"
        );
        let (mut volumes_kept, mut contents_kept) = (0, 0);
        for v in self.cluster.volumes_on(node)? {
            let delete = v.policy == OnNodeLoss::Delete || v.deleting;
            let done = match (&v.claim, v.policy) {
                (Some((namespace, name)), OnNodeLoss::Delete)
                    if self
                        .cluster
                        .delete_claim(namespace, name, v.claim_uid.as_deref())? =>
                {
                    round.claims_deleted.push((namespace.clone(), name.clone()));
                    Some(
                        "the claim is deleted (StorageClass onNodeLoss: Delete) so that its owner makes a new one",
                    )
                }
                (Some(_), OnNodeLoss::Retain) if !v.deleting => Some(
                    "it is kept (StorageClass onNodeLoss: Retain): restore it from a snapshot held elsewhere, or delete the claim for a new empty one",
                ),
                _ => None,
            };
            if let (Some(done), Some((namespace, name))) = (done, &v.claim) {
                self.note(
                    &Subject::Claim {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    },
                    "VolumeLostWithNode",
                    &format!(
                        "node {node} was deleted and with it this claim's volume ({}); {done}",
                        v.pv
                    ),
                );
            }
            if delete {
                self.cluster.release_volume(&v.pv)?;
                round.volumes_released.push(v.pv.clone());
            } else {
                volumes_kept += 1;
                round.volumes_reported.push(v.pv.clone());
            }
        }
        for c in self.cluster.contents_of(node)? {
            if c.deleting {
                self.cluster.release_content(&c.name)?;
                round.contents_released.push(c.name);
            } else {
                contents_kept += 1;
                round.contents_reported.push(c.name);
            }
        }
        if volumes_kept + contents_kept > 0 {
            self.note(
                &Subject::Node(node.to_owned()),
                "StrataDataLost",
                &format!(
                    "node {node} was deleted: {volumes_kept} volume(s) and {contents_kept} snapshot(s) of it are kept as objects, their data gone with the node"
                ),
            );
        }
        self.cluster.release_node(node)?;
        tracing::warn!(node, "Strata released the deleted Node");
        round.nodes_released.push(node.to_owned());
        Ok(())
    }

    /// An event; one that cannot be recorded is logged and does not stop the round.
    fn note(&self, subject: &Subject, reason: &str, message: &str) {
        tracing::warn!(?subject, reason, message);
        if let Err(e) = self.cluster.event(subject, reason, message) {
            tracing::warn!(error = %e, "could not record an event");
        }
    }
}

/// A cluster in memory, with a clock of its own for the Lease.
#[cfg(any(test, feature = "fake"))]
pub mod fake {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    #[derive(Debug, Default, Clone)]
    pub struct FakeNode {
        pub finalizers: BTreeSet<String>,
        pub deleting: bool,
    }

    #[derive(Debug, Default)]
    pub struct State {
        pub nodes: BTreeMap<String, FakeNode>,
        /// PV name → (node, volume).
        pub volumes: BTreeMap<String, (String, PinnedVolume)>,
        /// Claims and their uid.
        pub claims: BTreeMap<(String, String), String>,
        /// Content name → (node, content).
        pub contents: BTreeMap<String, (String, ManagedContent)>,
        /// Lease holder and the time (seconds on the fake clock) it was renewed.
        pub lease: Option<(String, u64)>,
        pub now: u64,
        pub events: Vec<(Subject, String)>,
        /// The next call of each name fails with this.
        pub failing: BTreeMap<&'static str, Error>,
    }

    #[derive(Default)]
    pub struct FakeNodeLossCluster {
        pub state: Mutex<State>,
    }

    impl FakeNodeLossCluster {
        pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn call(&self, name: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
            let mut s = self.lock();
            match s.failing.remove(name) {
                Some(e) => Err(e),
                None => Ok(s),
            }
        }
    }

    impl NodeLossCluster for FakeNodeLossCluster {
        fn protect_node(&self, node: &str) -> Result<()> {
            let mut s = self.call("protect_node")?;
            let n = s
                .nodes
                .get_mut(node)
                .ok_or_else(|| Error::NotFound(format!("node {node} does not exist")))?;
            n.finalizers.insert(FINALIZER.to_owned());
            Ok(())
        }

        fn deleted_nodes(&self) -> Result<Vec<String>> {
            let s = self.call("deleted_nodes")?;
            Ok(s.nodes
                .iter()
                .filter(|(_, n)| n.deleting && n.finalizers.contains(FINALIZER))
                .map(|(k, _)| k.clone())
                .collect())
        }

        fn hold_lease(&self, holder: &str, duration: Duration) -> Result<bool> {
            let mut s = self.call("hold_lease")?;
            let now = s.now;
            let free = match &s.lease {
                None => true,
                Some((h, renewed)) => h == holder || renewed + duration.as_secs() < now,
            };
            if free {
                s.lease = Some((holder.to_owned(), now));
            }
            Ok(free)
        }

        fn volumes_on(&self, node: &str) -> Result<Vec<PinnedVolume>> {
            let s = self.call("volumes_on")?;
            Ok(s.volumes
                .values()
                .filter(|(n, _)| n == node)
                .map(|(_, v)| v.clone())
                .collect())
        }

        fn delete_claim(&self, namespace: &str, name: &str, uid: Option<&str>) -> Result<bool> {
            let mut s = self.call("delete_claim")?;
            let key = (namespace.to_owned(), name.to_owned());
            let ours = s
                .claims
                .get(&key)
                .is_some_and(|u| uid.is_none_or(|want| want == u));
            if ours {
                s.claims.remove(&key);
            }
            Ok(ours)
        }

        fn release_volume(&self, pv: &str) -> Result<()> {
            let mut s = self.call("release_volume")?;
            s.volumes.remove(pv);
            Ok(())
        }

        fn contents_of(&self, node: &str) -> Result<Vec<ManagedContent>> {
            let s = self.call("contents_of")?;
            Ok(s.contents
                .values()
                .filter(|(n, _)| n == node)
                .map(|(_, c)| c.clone())
                .collect())
        }

        fn release_content(&self, name: &str) -> Result<()> {
            let mut s = self.call("release_content")?;
            // Its finalizers gone, a content being deleted is gone.
            s.contents.remove(name);
            Ok(())
        }

        fn release_node(&self, node: &str) -> Result<()> {
            let mut s = self.call("release_node")?;
            let gone = match s.nodes.get_mut(node) {
                Some(n) => {
                    n.finalizers.remove(FINALIZER);
                    n.deleting && n.finalizers.is_empty()
                }
                None => false,
            };
            if gone {
                s.nodes.remove(node);
            }
            Ok(())
        }

        fn event(&self, subject: &Subject, reason: &str, _message: &str) -> Result<()> {
            let mut s = self.call("event")?;
            s.events.push((subject.clone(), reason.to_owned()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
