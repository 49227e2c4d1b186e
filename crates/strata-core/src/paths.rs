//! Node paths (staging and target paths, the paths of stats and expansion): checked against
//! the allowed directories and the pool, opened from their allowed directory without
//! following symlinks, and claimed for the length of an operation so two volumes never meet
//! at one path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::inflight::{Guard, InFlight};
use crate::os::{Create, MountEntry, Mounter, NodePath};
use crate::validate::{absolute_path, bounded_display};

/// A node path that passed [`NodePaths::check`], with the allowed directory it lies in.
#[derive(Debug, Clone)]
pub struct CheckedPath {
    pub prefix: PathBuf,
    pub path: PathBuf,
}

pub struct NodePaths {
    /// Each allowed directory as given and as resolved at startup.
    allowed: Vec<PathBuf>,
    /// Directories no node path may lie in or above: the `--pool` directory and the pool.
    forbidden: Vec<PathBuf>,
    mounter: Arc<dyn Mounter>,
    inflight: Arc<InFlight>,
}

impl NodePaths {
    pub fn new(config: &Config, mounter: Arc<dyn Mounter>, inflight: Arc<InFlight>) -> Self {
        NodePaths {
            allowed: config.allowed_path_prefixes.clone(),
            forbidden: config
                .forbidden_paths
                .iter()
                .chain([&config.pool])
                .cloned()
                .collect(),
            mounter,
            inflight,
        }
    }

    /// Checks a path as a request gives it: required, absolute and clean, below an allowed
    /// directory and not in the pool.
    pub(crate) fn check(&self, field: &str, raw: &str) -> Result<CheckedPath> {
        let path = absolute_path(field, raw)?;
        self.check_clean(field, &path)
    }

    /// [`NodePaths::check`] for a path already absolute and clean.
    pub(crate) fn check_clean(&self, field: &str, path: &Path) -> Result<CheckedPath> {
        let prefix = self
            .allowed
            .iter()
            .filter(|p| path.starts_with(p) && path != p.as_path())
            .max_by_key(|p| p.as_os_str().len());
        let Some(prefix) = prefix else {
            let prefixes: Vec<String> = self
                .allowed
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
            .forbidden
            .iter()
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

    /// Opens a checked path without following symlinks; `None` when it does not exist and
    /// `create` is `Nothing`.
    pub(crate) fn open(&self, path: &CheckedPath, create: Create) -> Result<Option<NodePath>> {
        Ok(self.mounter.open_path(&path.prefix, &path.path, create)?)
    }

    /// Opens (creating) a checked path of the given kind: a directory for a filesystem, a
    /// file for a device node.
    pub(crate) fn create(&self, path: &CheckedPath, create: Create) -> Result<NodePath> {
        let node = self
            .open(path, create)?
            .ok_or_else(|| Error::Internal(format!("{} vanished", path.path.display())))?;
        let want_dir = create == Create::Directory;
        if node.is_dir != want_dir {
            return Err(Error::InvalidArgument(format!(
                "{} is {}; a {} volume needs {}",
                bounded_display(&path.path),
                if node.is_dir {
                    "a directory"
                } else {
                    "not a directory"
                },
                if want_dir { "filesystem" } else { "raw block" },
                if want_dir {
                    "a directory"
                } else {
                    "a file to bind the device onto"
                }
            )));
        }
        Ok(node)
    }

    /// The topmost mount at a checked path, with the opened path; `None` when the path does
    /// not exist.
    pub(crate) fn mount_at(
        &self,
        path: &CheckedPath,
    ) -> Result<Option<(NodePath, Option<MountEntry>)>> {
        let Some(node) = self.open(path, Create::Nothing)? else {
            return Ok(None);
        };
        let mount = self.mounter.mount_at(&node)?;
        Ok(Some((node, mount)))
    }

    /// Claims a path for the operation, so two volumes are never mounted at one path.
    pub(crate) fn claim(&self, path: &CheckedPath) -> Result<Guard> {
        self.inflight
            .acquire(format!("path {}", path.path.display()))
    }
}
