//! The driver: configuration, the pool's store and backend, the host, and the in-flight
//! guards. Controller and node operations are implemented on it in their own modules.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, IoContext, Result};
use crate::fault::FaultPoints;
use crate::inflight::{Guard, InFlight};
use crate::model::{Topology, VolumeRecord};
use crate::os::Host;
use crate::reaper::Reaper;
use crate::store::{Reconciliation, SnapshotStore, VolumeStore};

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
    /// Staging and target paths must lie under one of these (canonical) directories.
    pub allowed_path_prefixes: Vec<PathBuf>,
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
    /// Loop devices left on pool files that no volume owns, detached at startup.
    pub detached_orphan_loops: Vec<String>,
}

pub struct Driver {
    pub config: Config,
    pub(crate) store: VolumeStore,
    pub(crate) snapshots: SnapshotStore,
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
        let (snapshots, snapshot_report) = SnapshotStore::open(&config.pool, backend.as_ref())?;
        let mut report = Startup {
            volumes,
            snapshots: snapshot_report,
            detached_orphan_loops: vec![],
        };
        let driver = Driver {
            config,
            reaper: Reaper::start(backend.clone()),
            store,
            snapshots,
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

    /// Detaches loop devices whose backing file is in the pool but belongs to no volume (an
    /// image deleted or moved to lost+found while attached). A device that is still mounted
    /// somewhere is left alone and reported: unmounting it could lose a process's writes.
    fn detach_orphan_loops(&self) -> Result<Vec<String>> {
        let mounts = self.host.mounter.mounts()?;
        let mut detached = vec![];
        for dev in self.host.loops.list()? {
            let Ok(rel) = dev.backing_file.strip_prefix(&self.config.pool) else {
                continue;
            };
            let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy());
            let owned = match (parts.next().as_deref(), parts.next()) {
                (Some("volumes"), Some(id)) => self.store.get(&id).is_some(),
                // The pool image itself, when the pool lives in one.
                _ => rel.components().count() == 1,
            };
            if owned {
                continue;
            }
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
        let probe = self.config.pool.join(".probe");
        fs::write(&probe, b"ok")
            .and_then(|_| fs::remove_file(&probe))
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

    /// Space of the pool.
    pub fn pool_usage(&self) -> Result<crate::os::FsUsage> {
        self.backend.pool_usage()
    }

    pub fn volume_count(&self) -> usize {
        self.store.len()
    }

    /// Checks a staging or target path from a request: absolute and clean (checked by the
    /// caller), under an allowed prefix once symlinks are resolved, and not inside the pool.
    /// Returns the resolved path, which the operation then uses.
    pub(crate) fn node_path(&self, field: &str, path: &Path) -> Result<PathBuf> {
        let resolved = resolve_existing_prefix(path);
        let allowed = self
            .config
            .allowed_path_prefixes
            .iter()
            .any(|p| resolved.starts_with(p) && resolved != *p);
        if !allowed {
            let prefixes: Vec<String> = self
                .config
                .allowed_path_prefixes
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::InvalidArgument(format!(
                "{field} {} is outside the allowed directories ({}); start strata with --allowed-path-prefix to allow another",
                resolved.display(),
                prefixes.join(", ")
            )));
        }
        if resolved.starts_with(&self.config.pool) {
            return Err(Error::InvalidArgument(format!(
                "{field} {} is inside the pool; use a path outside {}",
                resolved.display(),
                self.config.pool.display()
            )));
        }
        Ok(resolved)
    }

    /// Ensures a directory exists, for mount points the driver creates.
    pub(crate) fn ensure_dir(path: &std::path::Path) -> Result<()> {
        fs::create_dir_all(path).ctx(|| format!("create directory {}", path.display()))
    }
}

/// `path` with its deepest existing ancestor resolved (symlinks followed), so a symlink
/// cannot lead a mount outside the allowed directories.
pub fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = vec![];
    while fs::symlink_metadata(&existing).is_err() {
        match existing.file_name() {
            Some(name) => rest.push(name.to_owned()),
            None => break,
        }
        if !existing.pop() {
            break;
        }
    }
    let mut resolved = fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_resolved_before_the_prefix_check() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("escape")).unwrap();
        assert_eq!(
            resolve_existing_prefix(&base.join("real/new/deeper")),
            base.join("real/new/deeper")
        );
        assert_eq!(
            resolve_existing_prefix(&base.join("escape/passwd-target")),
            PathBuf::from("/etc/passwd-target")
        );
    }
}
