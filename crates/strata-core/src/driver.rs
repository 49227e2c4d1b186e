//! The driver: configuration, the pool's store and backend, the host, and the in-flight
//! guards. Controller and node operations are implemented on it in their own modules.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::freeze::FreezeStats;
use crate::inflight::{Guard, InFlight};
use crate::model::{Topology, VolumeRecord};
use crate::os::{Create, FileId, Host, NodePath};
use crate::reaper::Reaper;
use crate::store::{GroupStore, Reconciliation, SnapshotStore, VolumeStore};
use crate::validate::bounded_display;

#[derive(Debug, Clone)]
pub struct Config {
    /// CSI driver name, e.g. `strata.csi.dev`.
    pub driver_name: String,
    pub node_id: String,
    /// Canonical path of the pool directory.
    pub pool: PathBuf,
    /// Reported as max_volumes_per_node; 0 means no limit.
    pub max_volumes_per_node: i64,
    /// Topology segment key naming this node; defaults to `<driver_name>/node`.
    pub topology_key: String,
    /// Staging and target paths must lie under one of these directories (each as given and
    /// as resolved at startup); no symlink is followed below them.
    pub allowed_path_prefixes: Vec<PathBuf>,
    /// Directories no node path may lie in: the `--pool` directory (which holds the pool
    /// image and its mount) and the pool itself.
    pub forbidden_paths: Vec<PathBuf>,
    /// The longest a group snapshot may keep its volumes' filesystems frozen; past it they
    /// are thawed and the group snapshot fails (ABORTED), keeping nothing.
    pub freeze_limit: std::time::Duration,
}

impl Config {
    pub fn default_topology_key(driver_name: &str) -> String {
        format!("{driver_name}/node")
    }
}

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

pub struct Driver {
    pub config: Config,
    pub(crate) store: VolumeStore,
    pub(crate) snapshots: SnapshotStore,
    pub(crate) groups: GroupStore,
    pub(crate) freezes: FreezeStats,
    pub(crate) reaper: Reaper,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) host: Host,
    inflight: Arc<InFlight>,
    pub(crate) crash: FaultPoints,
}

impl Driver {
    /// Opens the pool, reconciling it with what a previous run left behind.
    pub fn open(
        config: Config,
        host: Host,
        backend: Arc<dyn Backend>,
        crash: FaultPoints,
    ) -> Result<(Self, Startup)> {
        let (store, volumes) = VolumeStore::open(&config.pool, backend.as_ref())?;
        // Group evidence is read before the group store completes (and so removes) it.
        let interrupted_groups = GroupStore::interrupted(&config.pool)?;
        let (snapshots, snapshot_report) = SnapshotStore::open(&config.pool, backend.as_ref())?;
        let released_group_members =
            snapshots.release_group_members(&interrupted_groups, backend.as_ref())?;
        let (groups, group_report) = GroupStore::open(&config.pool, backend.as_ref())?;
        let mut report = Startup {
            volumes,
            snapshots: snapshot_report,
            groups: group_report,
            released_group_members,
            detached_orphan_loops: vec![],
        };
        let driver = Driver {
            config,
            reaper: Reaper::start(backend.clone()),
            store,
            snapshots,
            groups,
            freezes: FreezeStats::default(),
            backend,
            host,
            inflight: InFlight::new(),
            crash,
        };
        driver.thaw_all()?;
        report.detached_orphan_loops = driver.detach_orphan_loops()?;
        Ok((driver, report))
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// The topology of every volume: this node.
    pub fn topology(&self) -> Topology {
        [(
            self.config.topology_key.clone(),
            self.config.node_id.clone(),
        )]
        .into()
    }

    /// Whether `t` names this node.
    pub(crate) fn is_this_node(&self, t: &Topology) -> bool {
        t.get(&self.config.topology_key) == Some(&self.config.node_id)
    }

    /// The loop devices (major, minor) serving this pool's volumes, matched by the
    /// identity (device and inode) of each volume's image: one listing of the devices, one
    /// stat per volume.
    pub(crate) fn volume_devices(&self) -> Result<HashSet<(u32, u32)>> {
        let loops = self.host.loops.list()?;
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

    pub(crate) fn guard(&self, key: &str) -> Result<Guard> {
        self.inflight.acquire(key)
    }

    /// A guard for an operation that only reads the object (see [`InFlight`]).
    pub(crate) fn guard_shared(&self, key: &str) -> Result<Guard> {
        self.inflight.acquire_shared(key)
    }

    /// Waits until `deadline` for `key`: for the short sections readers of one object must
    /// take in turn, such as freezing its filesystem.
    pub(crate) fn guard_waiting_until(
        &self,
        key: &str,
        deadline: std::time::Instant,
    ) -> Result<Guard> {
        loop {
            match self.inflight.acquire(key) {
                Err(Error::Aborted(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// The record of an existing volume, or NOT_FOUND.
    pub(crate) fn volume(&self, id: &str) -> Result<VolumeRecord> {
        crate::validate::required_str("volume_id", id)?;
        self.store
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))
    }

    /// Waits for background removals of deleted volumes to finish.
    pub fn shut_down(&self) {
        self.reaper.shut_down();
    }

    pub fn snapshot_count(&self) -> usize {
        self.snapshots.len()
    }

    pub fn group_snapshot_count(&self) -> usize {
        self.groups.len()
    }

    /// Space of the pool.
    pub fn pool_usage(&self) -> Result<crate::os::FsUsage> {
        self.backend.pool_usage()
    }

    pub fn volume_count(&self) -> usize {
        self.store.len()
    }

    /// Checks a staging or target path as a request gives it: required, absolute and clean,
    /// below an allowed directory and not in the pool. The path is later opened from that
    /// directory without following symlinks ([`NodePath`]).
    pub(crate) fn node_path(&self, field: &str, raw: &str) -> Result<CheckedPath> {
        let path = crate::validate::absolute_path(field, raw)?;
        self.allowed_node_path(field, &path)
    }

    /// [`Driver::node_path`] for a path already absolute and clean.
    pub(crate) fn allowed_node_path(&self, field: &str, path: &Path) -> Result<CheckedPath> {
        let prefix = self
            .config
            .allowed_path_prefixes
            .iter()
            .filter(|p| path.starts_with(p) && path != p.as_path())
            .max_by_key(|p| p.as_os_str().len());
        let Some(prefix) = prefix else {
            let prefixes: Vec<String> = self
                .config
                .allowed_path_prefixes
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::InvalidArgument(format!(
                "{field} {} is outside the allowed directories ({}); start strata with --allowed-path-prefix to allow another",
                bounded_display(path),
                prefixes.join(", ")
            )));
        };
        if let Some(pool) = self
            .config
            .forbidden_paths
            .iter()
            .chain([&self.config.pool])
            .find(|p| path.starts_with(p) || p.starts_with(path))
        {
            return Err(Error::InvalidArgument(format!(
                "{field} {} is inside or above the pool; use a path outside {}",
                bounded_display(path),
                pool.display()
            )));
        }
        Ok(CheckedPath {
            prefix: prefix.clone(),
            path: path.to_owned(),
        })
    }

    /// Opens a checked node path without following symlinks.
    pub(crate) fn open_node(&self, path: &CheckedPath, create: Create) -> Result<Option<NodePath>> {
        self.host
            .mounter
            .open_path(&path.prefix, &path.path, create)
    }

    /// Claims a node path for the operation, so two volumes are never mounted at one path.
    pub(crate) fn path_guard(&self, path: &CheckedPath) -> Result<Guard> {
        self.inflight
            .acquire(format!("path {}", path.path.display()))
    }
}

/// A node path that passed [`Driver::node_path`], with the allowed directory it lies in.
#[derive(Debug, Clone)]
pub struct CheckedPath {
    pub prefix: PathBuf,
    pub path: PathBuf,
}
