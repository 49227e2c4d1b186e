//! The driver's configuration, as `strata serve`'s options resolve it.

use std::path::PathBuf;

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
    /// What other nodes may hold open here through the peer service.
    pub export_limits: crate::peer::ExportLimits,
}

impl Config {
    pub fn default_topology_key(driver_name: &str) -> String {
        format!("{driver_name}/node")
    }
}
