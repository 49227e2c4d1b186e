//! What the cluster (Kubernetes) says about where things are: each Strata's peer endpoint
//! by node, the node a volume is pinned to (its PV's node affinity) and the node a snapshot
//! was taken on (its VolumeSnapshotContent's managed-by label). Read when needed, never
//! kept: the objects are the truth. The real client lives in the server (kube-rs); the
//! fake here serves unit tests.

use std::collections::BTreeMap;

use crate::error::Result;

/// Narrow read access to the cluster's objects.
pub trait Cluster: Send + Sync {
    /// The peer service's address (`HOST:PORT`) of every ready Strata, by node name.
    fn peer_endpoints(&self) -> Result<BTreeMap<String, String>>;
    /// The node the PV of this driver with volume handle `volume_id` is pinned to.
    fn volume_node(&self, volume_id: &str) -> Result<Option<String>>;
    /// The node the PV named `pv_name` is pinned to, if it is this driver's PV of
    /// `volume_id` (one read instead of a list).
    fn named_volume_node(&self, _pv_name: &str, volume_id: &str) -> Result<Option<String>> {
        self.volume_node(volume_id)
    }
    /// The node whose Strata took snapshot `snapshot_id`.
    fn snapshot_node(&self, snapshot_id: &str) -> Result<Option<String>>;
    /// The names of every Node object (a node deleted for good has none).
    fn node_names(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// A cluster in memory: endpoints, PV node affinities and snapshot nodes as a test sets
/// them, with every read counted and any read made to fail.
#[cfg(any(test, feature = "fake"))]
#[derive(Default)]
pub struct FakeCluster {
    pub endpoints: std::sync::Mutex<BTreeMap<String, String>>,
    pub volumes: std::sync::Mutex<BTreeMap<String, String>>,
    pub snapshots: std::sync::Mutex<BTreeMap<String, String>>,
    /// The Node objects, when a test says which exist.
    pub node_names: std::sync::Mutex<Option<Vec<String>>>,
    pub reads: std::sync::atomic::AtomicUsize,
    /// The next reads fail with this (the API server unreachable).
    pub failing: std::sync::Mutex<Option<crate::error::Error>>,
}

#[cfg(any(test, feature = "fake"))]
impl FakeCluster {
    fn read<T: Clone>(&self, map: &std::sync::Mutex<T>) -> Result<T> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(e) = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(e);
        }
        Ok(map.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[cfg(any(test, feature = "fake"))]
impl Cluster for FakeCluster {
    fn peer_endpoints(&self) -> Result<BTreeMap<String, String>> {
        self.read(&self.endpoints)
    }

    fn volume_node(&self, volume_id: &str) -> Result<Option<String>> {
        Ok(self.read(&self.volumes)?.get(volume_id).cloned())
    }

    fn snapshot_node(&self, snapshot_id: &str) -> Result<Option<String>> {
        Ok(self.read(&self.snapshots)?.get(snapshot_id).cloned())
    }

    fn node_names(&self) -> Result<Option<Vec<String>>> {
        self.read(&self.node_names)
    }
}
