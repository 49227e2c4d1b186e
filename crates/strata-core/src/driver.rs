//! The driver: the configuration, and the features the CSI services call (controller,
//! snapshots, group snapshots, node) composed from the parts they share (volumes, node
//! paths, mounts, the freezer, capabilities), each in a module of its own.

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;

use crate::backend::Backend;
use crate::capability::Capabilities;
pub use crate::config::Config;
use crate::controller::{Controller, NodeTopology};
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::freezer::Freezer;
use crate::group::Groups;
use crate::ids::NodeHint;
use crate::inflight::InFlight;
use crate::io_limits::IoLimiter;
use crate::model::Topology;
use crate::mounts::Mounts;
use crate::moves::{Arrivals, Departures, Evacuation};
use crate::node::Node;
use crate::os::{FileId, Host};
use crate::paths::NodePaths;
use crate::peer::{ExportSources, Exports, Forwarding, Peers, RemoteCopies};
use crate::reaper::Reaper;
use crate::rekey::Rekey;
use crate::snapshot::Snapshots;
use crate::snapshot_metadata::SnapshotMetadata;
use crate::store::{GroupStore, Reconciliation, SnapshotStore, VolumeStore};
use crate::volumes::Volumes;

/// What reconciling the pool found at startup.
#[derive(Debug, Default, Clone)]
pub struct Startup {
    pub volumes: Reconciliation,
    pub snapshots: Reconciliation,
    pub groups: Reconciliation,
    /// Member snapshots of group snapshots whose creation or deletion a crash interrupted,
    /// removed at startup so no half group is ever visible.
    pub released_group_members: Vec<String>,
    /// Loop devices left on pool files that no volume owns, detached at startup.
    pub detached_orphan_loops: Vec<String>,
}

/// The driver: the features the CSI services call, composed from the shared parts they
/// hold (see docs/architecture.md). Opening it reconciles the pool with what a previous run
/// left behind.
pub struct Driver {
    pub config: Config,
    pub controller: Arc<Controller>,
    pub snapshots: Arc<Snapshots>,
    pub groups: Groups,
    pub node: Node,
    pub capabilities: Arc<Capabilities>,
    /// What the peer service offers other nodes.
    pub exports: Arc<Exports>,
    /// This node's volumes moving to other nodes.
    pub departures: Arc<Departures>,
    /// Volumes moving to this node, when the peer service is configured.
    pub arrivals: Option<Arc<Arrivals>>,
    /// This node's evacuation, when its Node asks.
    pub evacuation: Evacuation,
    /// Copies from other nodes, when the peer service is configured.
    pub remote: Option<Arc<RemoteCopies>>,
    /// The volumes' I/O limits, applied in the cgroups of their consumers.
    pub io_limits: Arc<IoLimiter>,
    /// Changed block tracking: the SnapshotMetadata service.
    pub snapshot_metadata: Arc<SnapshotMetadata>,
    /// Key rotation of encrypted volumes.
    pub rekey: Rekey,
    pub(crate) volumes: Arc<Volumes>,
    pub(crate) freezer: Arc<Freezer>,
    reaper: Arc<Reaper>,
    pub(crate) backend: Arc<dyn Backend>,
    host: Host,
}

impl Driver {
    /// Opens the pool, reconciling it with what a previous run left behind.
    pub fn open(
        config: Config,
        host: Host,
        backend: Arc<dyn Backend>,
        crash: FaultPoints,
        peers: Option<Arc<dyn Peers>>,
    ) -> Result<(Self, Startup)> {
        let (store, volume_report) = VolumeStore::open(&config.pool, backend.as_ref())?;
        // Group evidence is read before the group store completes (and so removes) it.
        let interrupted_groups = GroupStore::interrupted(&config.pool)?;
        let (snapshot_store, snapshot_report) =
            SnapshotStore::open(&config.pool, backend.as_ref())?;
        let released_group_members =
            snapshot_store.release_group_members(&interrupted_groups, backend.as_ref())?;
        let (group_store, group_report) = GroupStore::open(&config.pool, backend.as_ref())?;
        let mut report = Startup {
            volumes: volume_report,
            snapshots: snapshot_report,
            groups: group_report,
            released_group_members,
            detached_orphan_loops: vec![],
        };

        let inflight = InFlight::new();
        let reaper = Arc::new(Reaper::start(backend.clone()));
        let volumes = Arc::new(Volumes::new(
            store,
            backend.clone(),
            host.loops.clone(),
            inflight.clone(),
            crash.clone(),
        ));
        let mounts = Arc::new(Mounts::new(host.clone(), backend.clone()));
        let freezer = Arc::new(Freezer::new(
            host.clone(),
            backend.clone(),
            mounts.clone(),
            inflight.clone(),
        ));
        let capabilities = Arc::new(Capabilities::new(backend.clone()));
        let group_store = Arc::new(group_store);
        let snapshots = Arc::new(Snapshots::new(
            snapshot_store,
            group_store.clone(),
            volumes.clone(),
            freezer.clone(),
            backend.clone(),
            reaper.clone(),
            inflight.clone(),
            NodeHint::of(&config.node_id),
            crash.clone(),
        ));
        let io_limits = Arc::new(IoLimiter::new(
            volumes.clone(),
            host.cgroups.clone(),
            backend.limits_io(),
            backend.kind(),
        ));
        let forwarding = peers
            .as_ref()
            .map(|p| Arc::new(Forwarding::new(p.clone(), &config.node_id)));
        let peers_for_moves = peers.clone();
        let remote = peers.map(|p| Arc::new(RemoteCopies::new(p, &config.node_id, crash.clone())));
        let snapshot_metadata = Arc::new(SnapshotMetadata::new(
            snapshots.clone(),
            backend.clone(),
            forwarding.clone(),
            crash.clone(),
        ));
        let departures = Arc::new(Departures::open(
            &config.node_id,
            &config.pool,
            volumes.clone(),
            backend.clone(),
            freezer.clone(),
            crash.clone(),
        )?);
        let arrivals = match (&peers_for_moves, &remote) {
            (Some(peers), Some(remote)) => Some(Arc::new(Arrivals::open(
                &config.node_id,
                &config.pool,
                peers.clone(),
                remote.clone(),
                volumes.clone(),
                backend.clone(),
                crash.clone(),
            )?)),
            _ => None,
        };
        let evacuation = Evacuation::new(
            &config.node_id,
            volumes.clone(),
            crate::moves::evacuation::PARALLEL,
        );
        let exports = Arc::new(Exports::new(
            config.node_id.clone(),
            &config.pool,
            ExportSources {
                volumes: volumes.clone(),
                snapshots: snapshots.clone(),
                freezer: freezer.clone(),
                backend: backend.clone(),
                io_limits: io_limits.clone(),
                snapshot_metadata: snapshot_metadata.clone(),
                departures: departures.clone(),
            },
            config.export_limits,
        )?);
        let controller = Arc::new(Controller::new(
            volumes.clone(),
            snapshots.clone(),
            capabilities.clone(),
            freezer.clone(),
            backend.clone(),
            reaper.clone(),
            inflight.clone(),
            NodeTopology {
                key: config.topology_key.clone(),
                node_id: config.node_id.clone(),
            },
            remote.clone(),
            io_limits.clone(),
            forwarding,
            crash.clone(),
        ));
        let groups = Groups::new(
            group_store,
            snapshots.clone(),
            volumes.clone(),
            freezer.clone(),
            backend.clone(),
            reaper.clone(),
            inflight.clone(),
            config.freeze_limit,
            crash.clone(),
        );
        let node = Node::new(
            volumes.clone(),
            NodePaths::new(&config, host.mounter.clone(), inflight),
            mounts,
            capabilities.clone(),
            controller.clone(),
            host.clone(),
            backend.clone(),
            io_limits.clone(),
            departures.clone(),
            crash,
        );
        let rekey = Rekey::new(
            volumes.clone(),
            snapshots.clone(),
            NodeHint::of(&config.node_id),
        );
        let driver = Driver {
            config,
            controller,
            snapshots,
            groups,
            node,
            capabilities,
            exports,
            departures,
            arrivals,
            evacuation,
            remote,
            io_limits,
            snapshot_metadata,
            rekey,
            volumes,
            freezer,
            reaper,
            backend,
            host,
        };
        driver.freezer.thaw_all(&driver.volumes)?;
        driver.io_limits.reconcile();
        report.detached_orphan_loops = driver.detach_orphan_loops()?;
        Ok((driver, report))
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// The topology of every volume: this node.
    pub fn topology(&self) -> Topology {
        NodeTopology {
            key: self.config.topology_key.clone(),
            node_id: self.config.node_id.clone(),
        }
        .topology()
    }

    /// Detaches loop devices left on images that startup moved to `lost+found` (a volume it
    /// could not account for), matched by device and inode. A device that is still mounted
    /// somewhere is left alone and reported: unmounting it could lose a process's writes.
    /// Devices on any other file are never touched: they may be anybody's.
    fn detach_orphan_loops(&self) -> Result<Vec<String>> {
        let loops = self.host.loops.list()?;
        if loops.is_empty() {
            return Ok(vec![]);
        }
        let quarantined: HashSet<FileId> = match fs::read_dir(self.config.pool.join("lost+found")) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .flat_map(|e| [e.path().join(crate::backend::image::IMAGE_FILE), e.path()])
                .filter_map(|p| FileId::of(&p).ok())
                .collect(),
            Err(_) => return Ok(vec![]),
        };
        let mounts = self.host.mounter.mounts()?;
        let mut detached = vec![];
        for dev in loops
            .into_iter()
            .filter(|d| quarantined.contains(&d.backing))
        {
            if mounts.iter().any(|m| m.device() == (dev.major, dev.minor)) {
                tracing::warn!(device = %dev.path.display(), backing = %dev.backing_file.display(),
                    "a mounted loop device serves a file no volume owns; leaving it");
                continue;
            }
            tracing::warn!(device = %dev.path.display(), backing = %dev.backing_file.display(),
                "detaching a loop device that serves a file no volume owns");
            self.host.loops.detach(&dev)?;
            detached.push(dev.path.display().to_string());
        }
        Ok(detached)
    }

    /// Checks that the pool is usable: readable, writable, with its filesystem answering.
    pub fn probe(&self) -> Result<()> {
        let unhealthy = |what: String| {
            Error::FailedPrecondition(format!(
                "pool {what}; check the pool directory and its filesystem"
            ))
        };
        self.host
            .filesystems
            .check_writable(&self.config.pool)
            .map_err(|e| {
                unhealthy(format!(
                    "{} is not writable: {e}",
                    self.config.pool.display()
                ))
            })?;
        fs::read_dir(self.config.pool.join("volumes"))
            .map_err(|e| unhealthy(format!("cannot be listed: {e}")))?;
        self.backend
            .pool_usage()
            .map_err(|e| unhealthy(format!("usage unavailable: {e}")))?;
        Ok(())
    }

    /// Waits for background removals of deleted volumes to finish.
    pub fn shut_down(&self) {
        self.reaper.shut_down();
    }

    pub fn volume_count(&self) -> usize {
        self.volumes.count()
    }

    /// Space of the pool.
    pub fn pool_usage(&self) -> Result<crate::os::FsUsage> {
        self.backend.pool_usage()
    }

    /// The freeze windows of group snapshots so far.
    pub fn freeze_figures(&self) -> crate::freezer::FreezeFigures {
        self.freezer.figures()
    }
}
